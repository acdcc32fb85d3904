#!/usr/bin/env bash
# The paper's comparison in one command: data and ONE base model (run.sh stages 0-2), then
# every adapter preset adapted from that base, decoded and scored (stages 3-5), then one
# markdown table: per-accent CER, mean target CER, source CER, trainable parameters (and % of
# full fine-tuning of the projector), mean active experts.
#   recipes/paper_comparison.sh                               # synthetic default corpus, tiny model, CPU
#   recipes/paper_comparison.sh --size ci --presets "base lora hdmole"
#   recipes/paper_comparison.sh --corpus kespeech --model paper --ngpu 1
# Finished presets are skipped on a rerun (run.sh's done markers).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

presets="base full lora mole_dense mole_topk mole_topp adamole oracle_accent hdmole hdmole_no_hier hdmole_topk"
corpus=synthetic
size=default
model=tiny
exp_tag=""
nj=2
ngpu=0
base_args=""
# 5 minutes per preset on CPU (run.sh alone: 3): the setting of RESULTS.md; replace with --train-args
train_args="train.max_minutes=5"
decode_args=""
skip_setup=false

help_message="Usage: $0 [--presets \"a b ...\"] [--corpus synthetic|kespeech] [--size ci|default|large]
  [--model tiny|paper] [--exp-tag TAG] [--nj N] [--ngpu N] [--base-args ...] [--train-args ...]
  [--decode-args ...] [--skip-setup true|false]
Presets default: ${presets}"

. utils/parse_options.sh

common=(--corpus "${corpus}" --size "${size}" --model "${model}" --nj "${nj}" --ngpu "${ngpu}")
[ -n "${exp_tag}" ] && common+=(--exp-tag "${exp_tag}")

./run.sh "${common[@]}" --skip-setup "${skip_setup}" --stage 0 --stop-stage 2 --base-args "${base_args}"
for preset in ${presets}; do
    ./run.sh "${common[@]}" --skip-setup true --stage 3 --stop-stage 5 --adapter "${preset}" \
        --train-args "${train_args}" --decode-args "${decode_args}"
done

if [ -z "${exp_tag}" ]; then
    if [ "${corpus}" = synthetic ]; then exp_tag="synthetic_${size}_${model}"; else exp_tag="kespeech_${model}"; fi
fi
. ./path.sh
dirs=()
for preset in ${presets}; do dirs+=("exp/${exp_tag}/${preset}"); done
python -m hdmole.bin.score --compare "${dirs[@]}" --out "exp/${exp_tag}/comparison.md"
echo "table: exp/${exp_tag}/comparison.md"
