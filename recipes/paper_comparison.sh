#!/usr/bin/env bash
# The paper's comparison, fair and seeded, in one command (RESULTS.md):
#   1. data and ONE base model (run.sh stages 0-2);
#   2. the lr grid: every trained preset at every lr of the grid, seed 0, trained only; each
#      checkpoint is chosen by CER on the whole accent dev set (conf/train/adapt.yaml); a
#      preset whose best grid lr is on the grid's edge also gets the next lr beyond it;
#   3. per preset the lr with the lowest dev CER (recipes/paper_results.py choose; test sets
#      are never read for a choice), then that lr with every seed, trained, decoded, scored;
#   4. the report: seed means +/- sd, paired bootstrap CIs, the paper's claims, plots.
# Steps 2-3 are Hydra multiruns (python -m hdmole.bin.sweep): a cluster runs the same sweeps
# through a Hydra launcher (--launcher submitit_slurm, docs/recipe.md). Every run is a fixed
# budget of steps with its own seed: rerunning gives the same numbers on the same kind of
# machine; finished runs are skipped, so an interrupted suite resumes.
#   recipes/paper_comparison.sh                                  # synthetic default corpus, CPU, ~2 h
#   recipes/paper_comparison.sh --size ci --presets "lora hdmole" --lrs 1e-3 --seeds 0 --train-args "train.max_steps=4"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

presets="full lora lora_active mole_dense mole_topk mole_topp adamole oracle_accent hdmole hdmole_no_hier hdmole_topk"
lrs="1e-3,3e-3,1e-2"  # the lr grid, the same for every preset
seeds="0,1,2"
corpus=synthetic
size=default
model=tiny
exp_tag=""
nj=2
launcher=joblib    # Hydra launcher: basic (one job at a time), joblib, submitit_slurm, ...
jobs=2             # parallel jobs for the joblib launcher
threads=1          # torch threads per job (jobs x threads <= cores)
base_args=""       # Hydra overrides for the base model (run.sh stage 2)
train_args=""      # more Hydra overrides for every run, e.g. "train.max_steps=300"
out=RESULTS.md     # the report ("" = none)
skip_setup=false

help_message="Usage: $0 [--presets \"a b ...\"] [--lrs a,b,c] [--seeds 0,1,2] [--corpus synthetic|kespeech]
  [--size ci|default|large] [--model tiny|paper] [--exp-tag TAG] [--nj N] [--launcher NAME] [--jobs N]
  [--threads N] [--base-args \"k=v ...\"] [--train-args \"k=v ...\"] [--out FILE] [--skip-setup true|false]
Presets default: ${presets} (base is always decoded); lrs ${lrs}; seeds ${seeds}"

. utils/parse_options.sh

common=(--corpus "${corpus}" --size "${size}" --model "${model}" --nj "${nj}")
[ -n "${exp_tag}" ] && common+=(--exp-tag "${exp_tag}")
[ -n "${exp_tag}" ] || exp_tag="$([ "${corpus}" = synthetic ] && echo "synthetic_${size}" || echo kespeech)_${model}"
root="exp/${exp_tag}"
start=${SECONDS}

./run.sh "${common[@]}" --skip-setup "${skip_setup}" --stage 0 --stop-stage 2 --base-args "${base_args}"
. ./path.sh
mapfile -t base < <(./run.sh "${common[@]}" --skip-setup true --print-overrides true)
launch=("hydra/launcher=${launcher}")
[ "${launcher}" = joblib ] && launch+=("hydra.launcher.n_jobs=${jobs}")
# shellcheck disable=SC2206
one=(-m "${base[@]}" "hydra.sweep.dir=${root}/sweep" "train.num_threads=${threads}" data.num_workers=0 ${train_args})
sweep=("${one[@]}" "${launch[@]}")

echo "== lr grid (${lrs}), seed 0: ${presets}"
python -m hdmole.bin.sweep train "${sweep[@]}" "adapter=$(echo ${presets} | tr ' ' ,)" "train.lr=${lrs}" train.seed=0

# Sweeps whose lr differs per preset: one sweep per preset, at most --jobs of them at once
# (each runs its points one after another). With the joblib launcher a sweep's own points
# would run in parallel, but then a preset's lone last point leaves a core idle.
limit() { while [ "$(jobs -rp | wc -l)" -ge "${jobs}" ]; do wait -n || true; done; }
failed="${root}/sweep/failed"  # one line per failed background sweep
rm -f "${failed}"
background() { ("$@" || echo "$*" >> "${failed}") & }
check() { wait; [ ! -s "${failed}" ] || { echo "failed sweeps (logs above): $(cat "${failed}")" >&2; exit 1; }; }
[ "${launcher}" = joblib ] && per_preset=("${one[@]}") || per_preset=("${sweep[@]}")

echo "== one more lr beyond the grid's edge for presets whose best grid lr is on that edge"
for preset in ${presets}; do
    lr="$(python recipes/paper_results.py extend "${root}/sweep" "${preset}" --lrs "${lrs}")"
    if [ -n "${lr}" ]; then
        limit
        background python -m hdmole.bin.sweep train "${per_preset[@]}" "adapter=${preset}" "train.lr=${lr}" train.seed=0
    fi
done
check

echo "== chosen lr per preset (accent dev CER), every seed (${seeds}), decoded and scored"
for preset in base ${presets}; do
    if [ "${preset}" = base ]; then lr=0 run_seeds=0; else
        lr="$(python recipes/paper_results.py choose "${root}/sweep" "${preset}")" run_seeds="${seeds}"; fi
    limit
    background python -m hdmole.bin.sweep run "${per_preset[@]}" "adapter=${preset}" "train.lr=${lr}" "train.seed=${run_seeds}"
done
check

echo "suite_seconds=$(( SECONDS - start ))" >> "${root}/sweep/wall_time.txt"
if [ -n "${out}" ]; then
    python recipes/paper_results.py report "${root}/sweep" --presets "base ${presets}" --out "${out}" \
        $([ "${out}" = RESULTS.md ] && echo --readme README.md)
fi
