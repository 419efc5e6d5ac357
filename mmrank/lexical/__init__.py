"""Lexical match features: tokenization (`tokenize`), Spark features and statistics (`features`).

The feature vocabulary is defined here, free of Spark and torch, so the batch contract and the models can
name it: `LEX_FEATURES` is the order of the `lex` / `p_lex` arrays.
"""
FIELDS = ("title", "brand", "category", "description")
ALL, QUERY = "all", "query"
BM25_FIELDS = (ALL, "title")
LEX_FEATURES = (
    "bm25_all", "bm25_title",                       # BM25 (k1, b from config) over all fields / the title
    "cover_all", "cover_title", "cover_brand", "cover_category", "cover_description",  # share of query terms found
    "title_precision",                              # share of the title's terms that are query terms
    "phrase_title", "phrase_all",                   # the whole query, in order, inside the title / the text
    "unit_cover", "unit_conflict",                  # query number+unit tokens found / none found though both have some
    "brand_in_query", "category_in_query",          # every brand term in the query / share of category terms in it
    "query_terms",                                  # distinct query terms
)
N_LEX = len(LEX_FEATURES)
BM25_ALL = LEX_FEATURES.index("bm25_all")
