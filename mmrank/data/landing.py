"""The raw landing zone: files as they would arrive from upstream systems, written by the generator.

Layout under `<storage.raw_dir>/sample/` (paths in the JSON files are relative to that folder):
```
manifest.json                       generator settings, run_date, counts
products/products.jsonl             product_id, title, description, brand, category, attributes, image_path, audio_path
images/<shard>/<product_id>.png     product photos (shard = index // 1000)
audio/<shard>/<product_id>.wav      product sound clips (absent for some products)
queries/queries.jsonl               query_id, kind (typed|voice), query_text, audio_path
voice/<query_id>.wav                voice queries (toy tone-pair speech code)
query_log/events_<YYYY-MM-DD>.csv   one file per log day
truth/judgments.csv                 query_id, product_id, grade  (generator truth, never mixed with logs)
truth/latent.csv                    every product's latent attributes (for tests and analysis)
```
"""
from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mmrank.config import GeneratorConf
from mmrank.data import generator as gen

CHUNK = 1000


@dataclass(frozen=True)
class SampleLayout:
    root: Path

    @property
    def products(self) -> Path:
        return self.root / "products" / "products.jsonl"

    @property
    def queries(self) -> Path:
        return self.root / "queries" / "queries.jsonl"

    @property
    def log_dir(self) -> Path:
        return self.root / "query_log"

    @property
    def truth(self) -> Path:
        return self.root / "truth" / "judgments.csv"

    @property
    def latent(self) -> Path:
        return self.root / "truth" / "latent.csv"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @staticmethod
    def image_rel(i: int, pid: str) -> str:
        return f"images/{i // CHUNK:03d}/{pid}.png"

    @staticmethod
    def audio_rel(i: int, pid: str) -> str:
        return f"audio/{i // CHUNK:03d}/{pid}.wav"


def sample_layout(landing: Path) -> SampleLayout:
    """The generated sample's layout under the landing zone folder (`StoragePaths.landing`)."""
    return SampleLayout(landing / "sample")


def _write_media(data: gen.SampleData, g: GeneratorConf, lay: SampleLayout) -> None:
    r_img, r_aud = gen._rngs(g.seed, 6)[4:]
    p = data.products
    for start in range(0, len(p), CHUNK):
        chunk = p.iloc[start:start + CHUNK]
        (lay.root / SampleLayout.image_rel(start, "x")).parent.mkdir(parents=True, exist_ok=True)
        (lay.root / SampleLayout.audio_rel(start, "x")).parent.mkdir(parents=True, exist_ok=True)
        imgs = gen.render_images(chunk, g.image_size, r_img)
        waves = gen.render_sounds(chunk["sound_code"].to_numpy(), g.audio_seconds, g.audio_sample_rate, r_aud)
        for k, (i, pid, has_audio) in enumerate(zip(range(start, start + len(chunk)), chunk["product_id"],
                                                     chunk["has_audio"])):
            (lay.root / SampleLayout.image_rel(i, pid)).write_bytes(gen.png_bytes(imgs[k]))
            if has_audio:
                (lay.root / SampleLayout.audio_rel(i, pid)).write_bytes(gen.wav_bytes(waves[k], g.audio_sample_rate))
    (lay.root / "voice").mkdir(parents=True, exist_ok=True)
    for q in data.queries.itertuples():
        if q.kind == "voice":
            (lay.root / "voice" / f"{q.query_id}.wav").write_bytes(
                gen.wav_bytes(gen.render_voice(q.words, g.audio_sample_rate), g.audio_sample_rate))


def _jsonl(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_json(path, orient="records", lines=True, force_ascii=False)


def write_sample(g: GeneratorConf, run_date: dt.date, root: Path) -> dict[str, int]:
    """Generate the sample data set and write the landing zone under `root` (replacing it). Returns counts."""
    lay = SampleLayout(root)
    if root.exists():
        shutil.rmtree(root)
    data = gen.generate_tables(g, run_date)
    p, q = data.products, data.queries
    idx = np.arange(len(p))
    _jsonl(pd.DataFrame({
        "product_id": p["product_id"], "title": p["title"], "description": p["description"],
        "brand": p["brand"], "category": p["category"], "attributes": [{"material": m} for m in p["material"]],
        "image_path": [SampleLayout.image_rel(i, pid) for i, pid in zip(idx, p["product_id"])],
        "audio_path": [SampleLayout.audio_rel(i, pid) if a else None
                       for i, pid, a in zip(idx, p["product_id"], p["has_audio"])]}), lay.products)
    _jsonl(pd.DataFrame({"query_id": q["query_id"], "kind": q["kind"], "query_text": q["query_text"],
                         "audio_path": [f"voice/{i}.wav" if k == "voice" else None
                                        for i, k in zip(q["query_id"], q["kind"])]}), lay.queries)
    lay.log_dir.mkdir(parents=True, exist_ok=True)
    log = data.log.assign(day=data.log["event_ts"].dt.date)
    for day, part in log.groupby("day", sort=True):
        part.drop(columns="day").to_csv(lay.log_dir / f"events_{day.isoformat()}.csv", index=False,
                                        date_format="%Y-%m-%dT%H:%M:%S")
    lay.truth.parent.mkdir(parents=True, exist_ok=True)
    data.truth.to_csv(lay.truth, index=False)
    latent = p[["product_id"] + [f"{a}_code" for a in gen.VOCAB]].copy()
    for a, vals in gen.VOCAB.items():
        latent[a] = np.array(vals, dtype=object)[latent[f"{a}_code"]]
    latent.to_csv(lay.latent, index=False)
    q.drop(columns=["query_text"]).to_csv(lay.root / "truth" / "queries_latent.csv", index=False)
    _write_media(data, g, lay)
    counts = {"products": len(p), "queries": len(q), "voice_queries": int((q["kind"] == "voice").sum()),
              "judgments": len(data.truth), "log_events": len(data.log), "log_days": int(log["day"].nunique())}
    lay.manifest.write_text(json.dumps({"run_date": run_date.isoformat(), "generator": g.model_dump(),
                                        "counts": counts}, indent=1, sort_keys=True))
    return counts
