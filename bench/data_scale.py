"""Stages 0-1 at scale: wall and CPU time, peak memory, bytes and files of each data step on a
synthetic corpus (docs/scaling.md).

    python bench/data_scale.py --out /scratch/scale [--size large] [--nj 2] [--storages numpy_hdf5 lilcom_chunky]

Runs, each under /usr/bin/time: the corpus (stage 0, skipped when <out>/corpus is complete),
the cut sets (stage 1) and the features step once per storage, then prints one table row per
step (and writes it to <out>/data_scale.md). Memory is the largest resident set of any one
process of the step (GNU time's %M over the process tree's waited children).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MB = 1e6
ENCODER = Path(__file__).resolve().parent.parent / "pretrained" / "whisper"  # 80 mel bins, like the tiny models


def timed(name: str, out: Path, argv: list[str]) -> dict:
    record = out / f"{name}.time"
    log = out / f"{name}.log"
    with open(log, "w") as f:
        subprocess.run(["/usr/bin/time", "-f", "%e %U %S %M", "-o", str(record), *argv], stdout=f, stderr=f,
                       check=True)
    wall, user, system, max_kb = record.read_text().split()[-4:]
    return {"step": name, "wall_s": float(wall), "cpu_s": float(user) + float(system), "max_rss_mb": int(max_kb) / 1e3}


def tree_size(path: Path) -> tuple[int, int]:
    files = [f for f in path.rglob("*") if f.is_file()]
    return len(files), sum(f.stat().st_size for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", default="large", choices=["ci", "default", "large"])
    parser.add_argument("--nj", type=int, default=2)
    parser.add_argument("--storages", nargs="+", default=["numpy_hdf5", "lilcom_chunky"])
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    prepare = [sys.executable, "-m", "hdmole.bin.prepare"]
    data = [f"data.synthetic_size={args.size}", f"data.corpus_dir={out}/corpus", f"data.manifest_dir={out}/manifests",
            f"data.cuts_dir={out}/cuts", f"data.num_jobs={args.nj}"]
    rows = []
    corpus_manifest = out / "corpus" / "synthetic_manifest.json"  # written last by the generator
    if not corpus_manifest.exists():
        rows.append(timed("corpus", out, [*prepare, "corpus", *data]))
    hours = json.loads(corpus_manifest.read_text())["hours"]
    rows.append(timed("cuts", out, [*prepare, "cuts", *data]))
    for storage in args.storages:
        feature_dir = out / f"fbank_{storage}"
        row = timed(f"features_{storage}", out, [*prepare, "features", *data, f"data.feature_storage={storage}",
                                                 f"data.feature_dir={feature_dir}", f"model.encoder_dir={ENCODER}"])
        stats = json.loads((feature_dir / "stats.json").read_text())["cut_sets"]
        files, size = tree_size(feature_dir)
        cuts = sum(s["cuts"] for s in stats.values())
        row.update(files=files, bytes=size, cuts=cuts, feature_hours=sum(s["hours"] for s in stats.values()),
                   mb_per_hour=size / MB / sum(s["hours"] for s in stats.values()), cuts_per_s=cuts / row["wall_s"])
        rows.append(row)
    lines = [f"corpus: {args.size}, {hours:.2f} h of audio; data.num_jobs={args.nj}", "",
             "| step | wall s | CPU s | peak RSS MB | files | MB | MB per audio hour | cuts/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = (f"{r['files']} | {r['bytes'] / MB:.0f} | {r['mb_per_hour']:.1f} | {r['cuts_per_s']:.0f}"
                 if "files" in r else "- | - | - | -")
        lines.append(f"| {r['step']} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['max_rss_mb']:.0f} | {extra} |")
    text = "\n".join(lines) + "\n"
    (out / "data_scale.md").write_text(text, encoding="utf-8")
    (out / "data_scale.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
