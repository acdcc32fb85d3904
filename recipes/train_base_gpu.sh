#!/usr/bin/env bash
# Train the shipped tiny base model on one GPU within a fixed wall budget, evaluate it, and
# write the shipped files (pretrained/ layout, docs/base_model.md) into OUT_DIR.
#
#   recipes/train_base_gpu.sh OUT_DIR                        # GPU, default corpus, 16 cores
#   BUDGET_S=40 SIZE=ci NJ=2 recipes/train_base_gpu.sh /tmp/b  # CPU smoke test of every step
#
# Steps: run.sh stages 0-1 (corpus, cut sets, tiny checkpoints with text pre-training), stage 2
# as two phases with the recorded settings (2a: encoder + pinyin CTC with SpecAugment; 2b:
# encoder frozen, projector + LLM with cross-entropy), export (float16 safetensors) to OUT_DIR,
# then run.sh stages 2-5 with --pretrained OUT_DIR --adapter base: the shipped files themselves
# are installed, decoded and scored on the source and every accent test set.
# Environment: BUDGET_S (training seconds, 2a + 2b; default 404, the shipped base's), ENC_SHARE
# (share of it for 2a; default 0.35), SIZE (default), NJ (16), SEED (corpus seed, 0), TEXT_STEPS (LM text
# pre-training steps, 0 as run.sh), BATCH_S (seconds of audio per batch, 240), WORKERS (loader
# processes, 10), EXP_TAG (base_gpu_<size>), MAX_SKIPPED (updates with a non-finite gradient that
# may be skipped per phase, 20).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ $# -eq 1 ] || { echo "usage: $0 OUT_DIR" >&2; exit 1; }
out="$1"
size="${SIZE:-default}"
nj="${NJ:-16}"
seed="${SEED:-0}"
budget_s="${BUDGET_S:-404}"
enc_share="${ENC_SHARE:-0.35}"
text_steps="${TEXT_STEPS:-0}"
batch_s="${BATCH_S:-240}"
workers="${WORKERS:-10}"
exp_tag="${EXP_TAG:-base_gpu_${size}}"
max_skipped="${MAX_SKIPPED:-20}"
log() { echo "$(date '+%Y-%m-%dT%H:%M:%S') (train_base_gpu.sh) $*" >&2; }

. ./path.sh
python -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")' 
t_start=${SECONDS}

# ---- stages 0-1: corpus, cut sets, tiny checkpoints (LM text pre-training) -----------------
./run.sh --skip-setup true --size "${size}" --seed "${seed}" --nj "${nj}" --exp-tag "${exp_tag}" \
    --lm-text-steps "${text_steps}" --stage 0 --stop-stage 1
data_root="data/synthetic_${size}"
corpus_key="$(cat "${data_root}/.done/stage0")"
log "corpus: ${corpus_key} (stages 0-1 took $(( SECONDS - t_start )) s)"

# The same overrides run.sh gives its Python stages (data paths, tiny checkpoints).
data_preset=synthetic
[ -f "conf/data/synthetic_${size}.yaml" ] && data_preset="synthetic_${size}"
common=(model=tiny "data=${data_preset}" "data.corpus_dir=${data_root}/corpus" "data.manifest_dir=${data_root}/manifests"
        "data.cuts_dir=${data_root}/cuts" "data.num_jobs=${nj}" "data.feature_dir=${data_root}/fbank"
        data.synthetic=true "data.synthetic_size=${size}" "data.synthetic_seed=${seed}"
        "model.encoder_dir=${data_root}/tiny/whisper" "model.llm_dir=${data_root}/tiny/qwen")
# GPU batches: several hundred utterances; loader processes keep the GPU fed.
loader=(data.sampler=bucketing "data.batch_duration=${batch_s}" "data.num_workers=${workers}")
[ "${size}" = ci ] && loader=()  # the ci preset's simple sampler (too few cuts for buckets)
# Budgets in minutes for each phase; the lr decays over the wall budget (train.decay_by_time).
enc_min="$(python -c "print(round(${budget_s} * ${enc_share} / 60, 4))")"
llm_min="$(python -c "print(round(${budget_s} * (1 - ${enc_share}) / 60, 4))")"
exp_root="exp/${exp_tag}"
rm -rf "${exp_root}/base_model_encoder" "${exp_root}/base_model"

# ---- stage 2a: encoder + pinyin CTC with SpecAugment ---------------------------------------
t0=${SECONDS}
python -m hdmole.bin.train "${common[@]}" "${loader[@]}" experiment=base_encoder_long \
    "exp_dir=${exp_root}/base_model_encoder" "train.max_minutes=${enc_min}" train.max_steps=100000 \
    train.max_epochs=1000 train.decay_by_time=true train.max_skipped_steps="${max_skipped}"
log "stage 2a done in $(( SECONDS - t0 )) s"

# ---- stage 2b: encoder frozen; projector + LLM --------------------------------------------
t0=${SECONDS}
python -m hdmole.bin.train "${common[@]}" "${loader[@]}" experiment=base_llm_long \
    "exp_dir=${exp_root}/base_model" "train.init_from=${exp_root}/base_model_encoder" \
    "train.max_minutes=${llm_min}" train.max_steps=100000 train.max_epochs=1000 train.decay_by_time=true train.max_skipped_steps="${max_skipped}"
log "stage 2b done in $(( SECONDS - t0 )) s"

# ---- export the shipped files ----------------------------------------------------------------
meta="$(mktemp)"
python - "${meta}" "${exp_root}" "${budget_s}" "${enc_share}" "${seed}" "${text_steps}" "${batch_s}" <<'EOF'
import json, sys, torch
path, exp_root, budget, share, seed, text_steps, batch_s = sys.argv[1:]
def last_valid(run):
    rows = [json.loads(l) for l in open(f"{exp_root}/{run}/train_log.jsonl", encoding="utf-8")]
    rows = [r for r in rows if r["kind"] == "valid"]
    return rows[-1] if rows else None
info = {"command": f"BUDGET_S={budget} ENC_SHARE={share} SEED={seed} TEXT_STEPS={text_steps} BATCH_S={batch_s} "
                   "recipes/train_base_gpu.sh OUT_DIR",
        "corpus_seed": int(seed), "train_seed": 1234, "lm_text_steps": int(text_steps),
        "training_budget_s": float(budget), "encoder_share": float(share),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "phases": {"2a": "experiment=base_encoder_long", "2b": "experiment=base_llm_long"},
        "last_validation": {"2a": last_valid("base_model_encoder"), "2b": last_valid("base_model")}}
json.dump(info, open(path, "w"), indent=1)
EOF
if [ -e "${out}" ]; then  # replace only an earlier shipped base, never another directory
    [ -f "${out}/CORPUS_VERSION" ] || { log "ERROR: ${out} exists and is not a shipped base directory"; exit 1; }
    rm -rf "${out}"
fi
python -m hdmole.bin.pretrained export "${exp_root}/base_model" "${out}" --corpus "${corpus_key}" --meta "${meta}"
rm -f "${meta}"
cp "${exp_root}/base_model_encoder/train_log.jsonl" "${out}/train_log_2a_encoder.jsonl"
cp "${exp_root}/base_model/train_log.jsonl" "${out}/train_log_2b_llm.jsonl"
cat "${exp_root}/base_model_encoder/command.txt" "${exp_root}/base_model/command.txt" > "${out}/train_commands.txt"
cp "${exp_root}/base_model/versions.json" "${out}/versions.json"

# ---- evaluate the shipped files: install, decode every test set, score -----------------------
if [ "${EVAL:-1}" = 0 ]; then log "EVAL=0: shipped base not evaluated here"; exit 0; fi
./run.sh --skip-setup true --size "${size}" --seed "${seed}" --nj "${nj}" --exp-tag "${exp_tag}_shipped" \
    --pretrained "${out}" --adapter base --stage 2 --stop-stage 5
cp "exp/${exp_tag}_shipped/base/RESULTS.md" "${out}/RESULTS.md"
[ -f "exp/${exp_tag}_shipped/base/scores.json" ] && cp "exp/${exp_tag}_shipped/base/scores.json" "${out}/scores.json"
log "shipped base in ${out}: $(du -sh "${out}" | cut -f1); total $(( SECONDS - t_start )) s"
ls -la "${out}" "${out}/whisper" "${out}/qwen"
grep '"kind": "valid"' "${out}/train_log_2a_encoder.jsonl" | tail -3
grep '"kind": "valid"' "${out}/train_log_2b_llm.jsonl" | tail -5
cat "${out}/RESULTS.md"
