"""Deterministic multimodal sample data: latent product attributes rendered into text, image and audio.

Pure numpy / PIL / soundfile (no Spark), vectorised over products, so 100k products are practical.
Each modality carries attributes the others do not (see `MODALITY` and docs/data.md):
text = category, brand, material; image = colour, pattern; audio = sound. Queries ask for a category plus one
or two other attributes; the true grade is 0 (wrong category) .. 3 (all requested attributes match).
"""
from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
import soundfile as sf
from PIL import Image

from mmrank.config import GeneratorConf

VOCAB: dict[str, tuple[str, ...]] = {
    "category": ("sneaker", "jacket", "backpack", "watch", "headphones", "lamp"),
    "colour": ("red", "blue", "green", "yellow", "black", "white", "purple", "orange"),
    "pattern": ("plain", "striped", "dotted", "checked"),
    "sound": ("chime", "buzz", "click", "hum"),
    "brand": ("acme", "zenith", "nordik", "lumo", "vexa", "orbit"),
    "material": ("leather", "cotton", "metal", "plastic", "wool"),
}
MODALITY = {"category": "text", "brand": "text", "material": "text",
            "colour": "image", "pattern": "image", "sound": "audio"}
QUERY_ATTRS = ("colour", "pattern", "sound", "brand", "material")
COLOUR_RGB = np.array([(215, 30, 35), (30, 70, 215), (30, 170, 60), (240, 215, 30),
                       (20, 20, 20), (245, 245, 245), (135, 40, 175), (245, 130, 20)], dtype=np.float32)
BACKGROUND = 128.0
SOUND_HZ = np.array([1760.0, 220.0, 3000.0, 110.0])  # fundamental of chime, buzz, click, hum
SOUND_PHRASE = {"chime": "that chimes", "buzz": "that buzzes", "click": "that clicks", "hum": "that hums"}
FILLER = ("classic", "urban", "premium", "everyday", "new", "essential")
# Voice-query "speech" codebook: every lexicon word is a tone pair (low, high) played for WORD_S seconds.
LEXICON: tuple[str, ...] = tuple(sorted({w for vals in VOCAB.values() for w in vals}
                                        | {w for p in SOUND_PHRASE.values() for w in p.split()}))
WORD_S, GAP_S = 0.12, 0.04


def word_tones(word: str) -> tuple[float, float]:
    """(low Hz, high Hz) of a lexicon word in the voice-query codebook."""
    i = LEXICON.index(word)
    return 300.0 + 80.0 * (i // 8), 1500.0 + 120.0 * (i % 8)


@dataclass(frozen=True)
class ClickModel:
    """Position-based click model of the simulated users (indexed by true grade 0..3)."""

    click: tuple[float, ...] = (0.05, 0.25, 0.55, 0.85)      # P(click | examined, grade)
    cart: tuple[float, ...] = (0.05, 0.15, 0.35, 0.55)       # P(add-to-cart | click, grade)
    purchase: tuple[float, ...] = (0.10, 0.20, 0.40, 0.60)   # P(purchase | cart, grade)
    session_jitter: float = 0.3                               # per-session noise on the production score
    seconds_per_position: int = 2


@dataclass
class SampleData:
    """Everything the generator decides, as tables (latent attributes as integer codes)."""

    products: pd.DataFrame   # product_id, title, description, brand, category, material, has_audio, latent codes
    queries: pd.DataFrame    # query_id, kind, query_text, words, category + requested attribute codes (-1 = none)
    truth: pd.DataFrame      # query_id, product_id, grade  (the candidates)
    log: pd.DataFrame        # event_id, session_id, query_id, product_id, position, clicked, ..., event_ts


def _rngs(seed: int, n: int) -> list[np.random.Generator]:
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def _typo(word: str, rng: np.random.Generator) -> str:
    if len(word) < 3:
        return word
    i = int(rng.integers(0, len(word) - 1))
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def make_products(g: GeneratorConf, rng: np.random.Generator) -> pd.DataFrame:
    n = g.n_products
    codes = {a: rng.integers(0, len(v), n) for a, v in VOCAB.items()}
    words = {a: np.array(VOCAB[a], dtype=object)[codes[a]] for a in VOCAB}
    filler = np.array(FILLER, dtype=object)[rng.integers(0, len(FILLER), n)]
    u = rng.random((n, 5))
    titles = []
    for i in range(n):
        parts = [words["brand"][i].capitalize(), filler[i]]
        if u[i, 0] < g.title_colour_fraction:
            parts.append(words["colour"][i])
        mat, cat = words["material"][i], words["category"][i]
        if u[i, 1] < g.noisy_title_fraction:  # noisy: material dropped, typo in the category word
            mat, cat = None, _typo(cat, rng)
        titles.append(" ".join(p for p in parts + [mat, cat] if p))
    title = np.where(u[:, 2] < g.missing_title_fraction, None, np.array(titles, dtype=object))
    desc = np.where(u[:, 3] < 0.5, np.char.add(np.char.add("Made of ", words["material"].astype(str)), "."), None)
    df = pd.DataFrame({"product_id": [f"p{i:06d}" for i in range(n)], "title": title,
                       "description": desc, "brand": words["brand"], "category": words["category"],
                       "material": words["material"], "has_audio": u[:, 4] >= g.missing_audio_fraction})
    for a in VOCAB:
        df[f"{a}_code"] = codes[a]
    return df


def make_queries(g: GeneratorConf, products: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Each query copies the category and 1-2 attribute values of a random seed product (so grade 3 exists)."""
    seeds = rng.integers(0, len(products), g.n_queries)
    n_voice = int(round(g.n_queries * g.voice_query_fraction))
    voice = np.zeros(g.n_queries, bool)
    voice[rng.choice(g.n_queries, n_voice, replace=False)] = True
    rows = []
    for i, s in enumerate(seeds):
        k = 1 + int(rng.random() < 0.5)
        asked = set(rng.choice(QUERY_ATTRS, k, replace=False).tolist())
        p = products.iloc[int(s)]
        row = {"query_id": f"q{i:05d}", "kind": "voice" if voice[i] else "typed",
               "category_code": int(p["category_code"])}
        for a in QUERY_ATTRS:
            row[f"{a}_code"] = int(p[f"{a}_code"]) if a in asked else -1
        val = {a: VOCAB[a][row[f"{a}_code"]] for a in QUERY_ATTRS if a in asked}
        words = [val.get("colour"), val.get("pattern"), val.get("brand"), val.get("material"),
                 VOCAB["category"][row["category_code"]], *(SOUND_PHRASE[val["sound"]].split()
                                                           if "sound" in val else [])]
        row["words"] = " ".join(w for w in words if w)
        row["query_text"] = None if voice[i] else row["words"]
        rows.append(row)
    return pd.DataFrame(rows)


def true_grades(products: pd.DataFrame, q: pd.Series) -> np.ndarray:
    """Grade of every product for query q: 0 wrong category, else 1 + round(2 * matched / requested)."""
    same = products["category_code"].to_numpy() == q["category_code"]
    asked = [a for a in QUERY_ATTRS if q[f"{a}_code"] >= 0]
    matched = sum((products[f"{a}_code"].to_numpy() == q[f"{a}_code"]).astype(int) for a in asked)
    return np.where(same, 1 + np.round(2 * matched / len(asked)).astype(int), 0)


def make_candidates(g: GeneratorConf, products: pd.DataFrame, queries: pd.DataFrame,
                    rng: np.random.Generator) -> pd.DataFrame:
    """Per query: ~30% relevant (grade 3 first, then 2), ~40% same-category grade-1 hard negatives, the rest
    random products (any grade)."""
    c = min(g.candidates_per_query, len(products))
    quotas = (max(1, round(0.3 * c)), round(0.4 * c))
    out = []
    for _, q in queries.iterrows():
        gr = true_grades(products, q)
        relevant = np.concatenate([rng.permutation(np.flatnonzero(gr == 3)), rng.permutation(np.flatnonzero(gr == 2))])
        chosen: list[int] = relevant[:quotas[0]].tolist()  # grade 3 first: every query has a perfect match
        hard = np.flatnonzero(gr == 1)
        chosen += rng.choice(hard, min(quotas[1], len(hard)), replace=False).tolist()
        rest = np.setdiff1d(np.arange(len(products)), chosen)
        chosen += rng.choice(rest, c - len(chosen), replace=False).tolist()
        out.append(pd.DataFrame({"query_id": q["query_id"], "product_id": products["product_id"].to_numpy()[chosen],
                                 "grade": gr[chosen]}))
    return pd.concat(out, ignore_index=True)


def make_log(g: GeneratorConf, truth: pd.DataFrame, run_date: dt.date, rng: np.random.Generator,
             cm: ClickModel = ClickModel()) -> pd.DataFrame:
    """Sessions of impressions with position-biased clicks, carts and purchases over `log_days` days."""
    out = []
    click_p, cart_p, buy_p = (np.asarray(x) for x in (cm.click, cm.cart, cm.purchase))
    end = dt.datetime.combine(run_date, dt.time())
    for qid, cand in truth.groupby("query_id", sort=True):
        gr, pids, c, s = cand["grade"].to_numpy(), cand["product_id"].to_numpy(), len(cand), g.sessions_per_query
        prod_score = gr + rng.normal(0, g.ranker_noise, c)          # the production ranker's fixed error
        score = prod_score + rng.normal(0, cm.session_jitter, (s, c))
        explore = rng.random(s) < g.explore_fraction
        score[explore] = rng.random((int(explore.sum()), c))          # exploration: uniformly random order
        order = np.argsort(-score, axis=1, kind="stable")             # [s, c] candidate index per position
        pos = np.arange(1, c + 1)
        sg = gr[order]
        examined = rng.random((s, c)) < (1.0 / pos) ** g.position_bias_eta
        clicked = examined & (rng.random((s, c)) < click_p[sg])
        carted = clicked & (rng.random((s, c)) < cart_p[sg])
        bought = carted & (rng.random((s, c)) < buy_p[sg])
        day = rng.integers(0, g.log_days, s)
        start = rng.integers(0, 86400 - c * cm.seconds_per_position - 1, s)
        ts = (np.datetime64(end) - day.astype("timedelta64[D]") + start.astype("timedelta64[s]"))[:, None] \
            + (pos * cm.seconds_per_position).astype("timedelta64[s]")[None, :]
        sess = np.array([f"{qid}-s{k:04d}" for k in range(s)], dtype=object)
        out.append(pd.DataFrame({
            "event_id": [f"{x}-{p:02d}" for x in sess for p in pos], "session_id": np.repeat(sess, c),
            "query_id": qid, "product_id": pids[order].ravel(), "position": np.tile(pos, s),
            "clicked": clicked.ravel(), "added_to_cart": carted.ravel(), "purchased": bought.ravel(),
            "event_ts": ts.ravel()}))
    return pd.concat(out, ignore_index=True)


def generate_tables(g: GeneratorConf, run_date: dt.date) -> SampleData:
    """All generator decisions (no media rendering): products, queries, candidates with truth, query log."""
    r_prod, r_query, r_cand, r_log = _rngs(g.seed, 4)
    products = make_products(g, r_prod)
    queries = make_queries(g, products, r_query)
    truth = make_candidates(g, products, queries, r_cand)
    return SampleData(products, queries, truth, make_log(g, truth, run_date, r_log))


# ---- media rendering (vectorised per chunk) ---------------------------------------------------------------
def _shape_masks(size: int) -> np.ndarray:
    """[6, size, size] silhouettes, one per category (sneaker, jacket, backpack, watch, headphones, lamp)."""
    v, u = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    r = np.hypot(u, v)
    return np.stack([
        (u / 0.85) ** 2 + ((v - 0.35) / 0.35) ** 2 < 1,
        ((np.abs(u) < 0.45) & (np.abs(v) < 0.8)) | ((np.abs(u) < 0.85) & (v > -0.8) & (v < -0.2)),
        (np.abs(u) < 0.6) & (np.abs(v) < 0.75),
        (r < 0.55) | (np.abs(u) < 0.2),
        ((r > 0.45) & (r < 0.72) & (v < 0.1)) | ((np.abs(np.abs(u) - 0.6) < 0.18) & (np.abs(v - 0.3) < 0.3)),
        ((v > -0.6) & (v < 0.4) & (np.abs(u) < (v + 0.6) * 0.6)) | ((np.abs(u) < 0.08) & (v >= 0.4)),
    ])


def render_images(products: pd.DataFrame, size: int, rng: np.random.Generator) -> np.ndarray:
    """[n, size, size, 3] uint8: category silhouette filled with the colour, pattern pixels darkened."""
    n = len(products)
    y, x = np.mgrid[0:size, 0:size]
    period = max(4, size // 6)
    ph = rng.integers(0, period, (n, 2))[:, :, None, None]
    xs, ys = x[None] + ph[:, 0], y[None] + ph[:, 1]
    half = period // 2
    pats = np.stack([np.zeros((n, size, size), bool), (ys // half) % 2 == 1,
                     ((xs % period - half) ** 2 + (ys % period - half) ** 2) < (period / 3) ** 2,
                     ((xs // half) + (ys // half)) % 2 == 1])
    pattern = np.take_along_axis(pats, products["pattern_code"].to_numpy()[None, :, None, None], 0)[0]
    colour = COLOUR_RGB[products["colour_code"].to_numpy()] + rng.normal(0, 8, (n, 3))
    fill = colour[:, None, None, :] * np.where(pattern, 0.55, 1.0)[..., None]
    mask = _shape_masks(size)[products["category_code"].to_numpy()][..., None]
    img = np.where(mask, fill.astype(np.float32), np.float32(BACKGROUND))
    img += rng.integers(-4, 5, img.shape, dtype=np.int8)  # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8)


def render_sounds(sound_codes: np.ndarray, seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """[n, T] float32 clips: chime = decaying bell, buzz = square wave, click = pulsed tone, hum = low sine."""
    n, t = len(sound_codes), np.arange(int(seconds * sr)) / sr
    f0 = SOUND_HZ[sound_codes] * rng.uniform(0.97, 1.03, n)
    ph = 2 * np.pi * f0[:, None] * t[None, :]
    wave = np.empty_like(ph)
    for code, fn in enumerate((
            lambda p: np.sin(p) * np.exp(-3 * t) + 0.3 * np.sin(2.76 * p) * np.exp(-6 * t),
            lambda p: 0.6 * np.sign(np.sin(p)),
            lambda p: np.sin(p) * ((t * 10) % 1 < 0.3),
            lambda p: np.sin(p) + 0.25 * np.sin(2 * p))):
        sel = sound_codes == code
        wave[sel] = fn(ph[sel])
    amp = rng.uniform(0.3, 0.6, n)[:, None]
    return (amp * wave).astype(np.float32) + 0.02 * rng.standard_normal(wave.shape, dtype=np.float32)


def render_voice(words: str, sr: int) -> np.ndarray:
    """The toy 'speech' code of a query: each word its codebook tone pair, Hann-windowed, then a short gap."""
    t = np.arange(int(WORD_S * sr)) / sr
    win, gap = np.hanning(len(t)), np.zeros(int(GAP_S * sr))
    parts = []
    for w in words.split():
        lo, hi = word_tones(w)
        parts += [0.4 * win * (np.sin(2 * np.pi * lo * t) + np.sin(2 * np.pi * hi * t)), gap]
    return np.concatenate(parts).astype(np.float32)


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def wav_bytes(wave: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()
