"""A finished run's test CER with each feature storage: does lossy storage move the numbers?

    python bench/feature_storage_cer.py --run exp/synthetic_default_tiny/sweep/base/lr0.0_seed0 \
        --out /scratch/storage_cer [--variants on_the_fly numpy_hdf5 lilcom-8 lilcom-5]

For each variant: a copy of the run (config and exported model) whose data section names that
storage, features for the test sets (stored under the copy), `hdmole.bin.decode` and
`hdmole.bin.score` without the encoder cache; then the mean accent / source CER of each and the
paired bootstrap interval of its difference to the first variant (docs/scaling.md).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from hdmole.config import RETIRED_KEYS
from hdmole.data.config import DataConfig
from hdmole.data.features import compute_features, job_pool
from hdmole.score import paired_bootstrap, utterance_errors

VARIANTS = {"numpy_hdf5": ("numpy_hdf5", -8), "on_the_fly": (None, -8), "lilcom-8": ("lilcom_chunky", -8),
            "lilcom-5": ("lilcom_chunky", -5)}
TEST_SETS = ("kespeech_test", "aishell_test")


def prepare_copy(run: Path, exp: Path, storage: str | None, tick: int) -> None:
    shutil.rmtree(exp, ignore_errors=True)
    exp.mkdir(parents=True)
    shutil.copytree(run / "model", exp / "model")
    shutil.copy(run / "model_info.json", exp / "model_info.json")
    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    for section, key in RETIRED_KEYS:
        cfg[section].pop(key, None)
    cfg["data"].update(feature_storage=storage, lilcom_tick_power=tick, feature_dir=str(exp / "fbank"),
                       encoder_cache_dir=None)
    (exp / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    if storage:
        data = DataConfig(**cfg["data"])
        with job_pool(data.num_jobs) as pool:
            for name in TEST_SETS:
                corpus, split = name.split("_")
                compute_features(data, data.cuts_path(corpus, split), data.feature_cuts_path(corpus, split), 80, pool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished run (config.yaml, model/)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    lines = ["| features | mean accent CER | source CER | accent diff [95 % CI] | source diff | utterances with other edits |",
             "|---|---|---|---|---|---|"]
    reference = args.out / args.variants[0]
    for name in args.variants:
        exp = args.out / name
        prepare_copy(args.run, exp, *VARIANTS[name])
        for step in (["hdmole.bin.decode", f"exp_dir={exp}"], ["hdmole.bin.score", str(exp), "--name", name]):
            subprocess.run([sys.executable, "-m", *step], check=True)
        scores = json.loads((exp / "scores.json").read_text())
        cells, changed = [], 0
        for test_set in TEST_SETS:
            ours, ref = utterance_errors(exp / "decode" / test_set), utterance_errors(reference / "decode" / test_set)
            ids = sorted(ours)
            groups = [ours[i][2] if test_set.startswith("kespeech") else "all" for i in ids]
            diff, low, high = paired_bootstrap([ours[i][0] for i in ids], [ref[i][0] for i in ids],
                                               [ours[i][1] for i in ids], groups)
            cells.append(f"{diff:+.2f} [{low:+.2f}, {high:+.2f}]")
            changed += sum(ours[i][0] != ref[i][0] for i in ids)
        lines.append(f"| {name} | {scores['mean_accent_cer']:.2f} | {scores['source_cer']:.2f} | {cells[0]} | "
                     f"{cells[1]} | {changed} of {scores['utterances']} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    (args.out / "feature_storage_cer.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
