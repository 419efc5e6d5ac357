"""The text tower learns: adapter / top-layer fine-tuning on ranking lists, saved as a versioned encoder folder
that the text encoder loads and uses for products and queries alike."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmrank.config import FeaturesConf, FinetuneConf
from mmrank.encoders.registry import get_encoder
from mmrank.encoders.text import ADAPTER_FILE, mean_pool
from mmrank.ranker.finetune import Adapter, ListData, Tower, list_scores, save_encoder, train_tower

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory):
    from pathlib import Path

    from test_encoders import tiny_bert_dir

    return Path(tiny_bert_dir(tmp_path_factory.mktemp("tiny_bert")))

# made-up query words for real product words: the base encoder cannot know them, a tuned tower can learn them
CONCEPTS = [("blorf", "hammer"), ("quazz", "faucet"), ("zindle", "ladder"), ("mraxo", "drill"),
            ("tepko", "shovel"), ("vurnel", "lamp")]
ADJ = ["steel", "red", "cheap", "heavy duty", "compact", "outdoor", "classic", "pro"]
QUERY_FORMS = ["{}", "{} tool", "best {}", "{} for home", "new {}", "{} sale"]


def concept_lists(seed: int = 0, list_size: int = 8) -> tuple[list[str], ListData, ListData]:
    """Texts and train / validation lists: each query (a made-up word in some phrasing) has 2 relevant products
    (its real word) and 6 of other concepts. Validation uses phrasings and products training never saw."""
    r = np.random.default_rng(seed)
    products = {c: [f"{a} {w}" for a in ADJ] for c, (_, w) in enumerate(CONCEPTS)}
    texts: list[str] = [t for ps in products.values() for t in ps]
    index = {t: i for i, t in enumerate(texts)}

    def lists(forms, adj_ids):
        q, p, g = [], [], []
        for c, (word, _) in enumerate(CONCEPTS):
            for form in forms:
                texts.append(form.format(word))
                rel = [products[c][i] for i in r.choice(adj_ids, 2, replace=False)]
                neg = [products[o][i] for o in r.choice([o for o in products if o != c], 6)
                       for i in r.choice(adj_ids, 1)]
                slots = rel + neg
                order = r.permutation(list_size)
                q.append(len(texts) - 1)
                p.append([index[slots[j]] for j in order])
                g.append([3.0 if j < 2 else 0.0 for j in order])
        return ListData(np.array(q), np.array(p), np.array(g, np.float32))

    return texts, lists(QUERY_FORMS[:4], [0, 1, 2, 3, 4, 5]), lists(QUERY_FORMS[4:], [6, 7])


def test_adapter_learns_unknown_query_words_and_the_saved_encoder_reproduces_it(tmp_path):
    texts, train, val = concept_lists()
    base = get_encoder("text", FeaturesConf(device="cpu"))
    module = Adapter(base.encode(texts))
    cfg = FinetuneConf(mode="adapter", epochs=25, patience=25, batch_size=4, lr=1e-2)
    state, info = train_tower(module, train, val, cfg, "lambdarank", seed=0)
    assert state is not None and info["best_epoch"] >= 0
    assert info["best_val_ndcg10"] > info["base_val_ndcg10"] + 0.1          # it learned the made-up words
    folder = save_encoder(tmp_path / "enc", base.path, "all-MiniLM-L6-v2", module, state, "adapter", {"x": 1})
    assert (folder / ADAPTER_FILE).exists() and folder.name.startswith("all-MiniLM-L6-v2-ft-adapter-")
    tuned = get_encoder("text", FeaturesConf(device="cpu", text={"path": str(folder)}))
    assert tuned.version != base.version                                   # features get re-encoded
    module.load_state_dict(state, strict=False)
    probe = [texts[int(val.q[0])], texts[int(val.p[0, 0])]]                # a query and a product: same tower
    with torch.no_grad():
        want = module(torch.as_tensor([int(val.q[0]), int(val.p[0, 0])])).numpy()
    assert np.allclose(tuned.encode(probe), want, atol=1e-5)


def test_top_layer_tower_caches_frozen_layers_exactly_and_saves_only_its_layer(tmp_path, tiny_bert_folder):
    from transformers import AutoModel

    texts = ["steel hammer", "red faucet with a long spout", "ladder", "blorf"]
    tower = Tower(tiny_bert_folder, texts, FinetuneConf(mode="top", top_layers=1, max_length=16))
    assert [p.requires_grad for p in tower.model.encoder.layer[0].parameters()] == \
        [False] * len(list(tower.model.encoder.layer[0].parameters()))
    tok = tower._tokens(texts)
    with torch.no_grad():
        full = mean_pool(tower.model(**tok).last_hidden_state, tok["attention_mask"])
        cached = tower(torch.arange(len(texts)))
    assert torch.allclose(cached, full, atol=2e-2)                  # frozen states cached (bf16), same result
    small = ListData(np.array([3, 3]), np.array([[0, 1, 2, -1]] * 2), np.array([[3, 0, 0, -1]] * 2, np.float32))
    opt = torch.optim.SGD([p for p in tower.parameters() if p.requires_grad], lr=0.5)
    loss = -list_scores(tower, small, np.arange(2), 5.0)[:, 0].sum()
    loss.backward()
    opt.step()
    state = {n: p.detach().clone() for n, p in tower.named_parameters() if p.requires_grad}
    folder = save_encoder(tmp_path / "enc", tiny_bert_folder, "tiny", tower, state, "top", {})
    base, tuned = AutoModel.from_pretrained(str(tiny_bert_folder)), AutoModel.from_pretrained(str(folder))
    same = {n: torch.equal(p, dict(tuned.named_parameters())[n]) for n, p in base.named_parameters()}
    assert all(v for n, v in same.items() if not n.startswith("encoder.layer.1."))
    assert not all(v for n, v in same.items() if n.startswith("encoder.layer.1."))
    v_base = get_encoder("text", FeaturesConf(device="cpu", text={"path": str(tiny_bert_folder)})).version
    v_tuned = get_encoder("text", FeaturesConf(device="cpu", text={"path": str(folder)})).version
    assert v_base != v_tuned
