#!/usr/bin/env bash
# HDMoLE recipe (ESPnet style): data -> base LLM-ASR model -> accent adaptation -> decoding -> CER.
#   ./run.sh                                   # stages 0-5 on the default synthetic corpus, CPU
#   ./run.sh --stage 3 --stop-stage 5 --adapter lora --train-args "train.lr=5e-4"
#   ./run.sh --corpus kespeech --model paper --ngpu 1
# Every stage is idempotent: a done marker (written only after success) holds the stage's
# settings; a rerun with the same settings skips the stage, changed settings redo it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"  # paths below are relative to the recipe root

stage=0
stop_stage=5
corpus=synthetic   # synthetic | kespeech
size=default       # synthetic corpus size: ci | default | large
model=tiny         # conf/model/<model>.yaml: tiny (built here) | paper (local real checkpoints)
adapter=hdmole     # conf/adapter/<adapter>.yaml; base = no adaptation
exp_tag=""         # experiment root exp/<tag>; default <corpus>_<size>_<model>
nj=2               # parallel jobs for data preparation
ngpu=0             # 0: CPU (or one GPU if present); N > 1: torchrun with N processes per node
nnodes=1           # nodes; > 1: torchrun on every node with MASTER_ADDR, MASTER_PORT, NODE_RANK set
train_base=auto    # auto: shipped base if it matches the corpus, else train (skipped when up to date) | true: retrain | false: reuse
pretrained=pretrained  # the shipped tiny base (HF layout, docs/base_model.md); "" = never use it
seed=0             # synthetic corpus seed
lm_text_steps=0    # tiny LM text pre-training steps in stage 1 (2 CPU cores: ~0.3-2 s each)
base_args=""       # Hydra overrides for the base model training (stage 2)
train_args=""      # Hydra overrides for the adaptation (stage 3), e.g. "train.lr=5e-4 adapter.rank=4"
decode_args=""     # Hydra overrides for decoding (stage 4), e.g. "decode.num_beams=4"
skip_setup=false   # true: do not run tools/setup_env.sh
print_overrides=false  # true: print stage 3's Hydra overrides (one per line) and exit (recipes/)

help_message="Usage: $0 [options]
  --stage N / --stop-stage N   stages to run (0 data, 1 cuts+features+tokenizer+tiny checkpoints,
                               2 base model, 3 adaptation, 4 decoding, 5 scoring); default 0-5
  --corpus synthetic|kespeech  default synthetic (real roots in db.sh)
  --size ci|default|large      synthetic corpus size (default: default)
  --model tiny|paper           model config (default: tiny)
  --adapter PRESET             conf/adapter/<PRESET>.yaml (default: hdmole; base = no adaptation)
  --exp-tag TAG                experiment root exp/TAG
  --nj N                       data preparation jobs (default 2)
  --ngpu N                     GPUs per node (torchrun when N > 1; default 0 = CPU or the one GPU;
                               without GPUs N > 1 starts N gloo processes on the CPU)
  --nnodes N                   nodes (default 1); N > 1: run stages 2-3 on every node with
                               MASTER_ADDR, MASTER_PORT (default 29500) and NODE_RANK (0..N-1) set
                               and exp/ on a shared file system (docs/scaling.md)
  --train-base auto|true|false train the base model in stage 2 (auto: use the shipped tiny base
                               when it matches the corpus version, else train, skipped when the
                               base trained here is up to date; false: the existing base)
  --pretrained DIR             shipped tiny base model (default: pretrained; \"\" = never use it)
  --seed N                     synthetic corpus seed (default 0)
  --lm-text-steps N            tiny LM text pre-training steps in stage 1 (default 0)
  --base-args \"k=v ...\"        Hydra overrides for stage 2
  --train-args \"k=v ...\"       Hydra overrides for stage 3
  --decode-args \"k=v ...\"      Hydra overrides for stage 4
  --skip-setup true|false      skip tools/setup_env.sh
  --print-overrides true       print the adaptation's Hydra overrides (data, base model,
                               experiment=adapt, train.init_from), one per line, and exit
Options accept --name value, --name=value, dashes or underscores."

. utils/parse_options.sh

# tqdm redraws every 0.1 s by default: in a log file that is megabytes of progress bars.
[ -t 2 ] || export TQDM_MININTERVAL="${TQDM_MININTERVAL:-30}"

log() { echo "$(date '+%Y-%m-%dT%H:%M:%S') (${BASH_SOURCE[1]##*/}:${BASH_LINENO[0]}) $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
one_of() { local v="$1"; shift; for a in "$@"; do [ "$v" = "$a" ] && return 0; done; return 1; }

one_of "${corpus}" synthetic kespeech || die "--corpus ${corpus}: choose synthetic or kespeech"
one_of "${size}" ci default large || die "--size ${size}: choose ci, default or large"
one_of "${train_base}" auto true false || die "--train-base ${train_base}: choose auto, true or false"
[[ "${stage}" =~ ^[0-9]+$ && "${stop_stage}" =~ ^[0-9]+$ ]] || die "--stage/--stop-stage must be integers"
[[ "${nj}" =~ ^[1-9][0-9]*$ ]] || die "--nj ${nj}: a positive integer"
[[ "${ngpu}" =~ ^[0-9]+$ ]] || die "--ngpu ${ngpu}: a non-negative integer"
[[ "${nnodes}" =~ ^[1-9][0-9]*$ ]] || die "--nnodes ${nnodes}: a positive integer"
# Training launcher: plain python for one process, torchrun otherwise (DDP/FSDP, train.parallel).
train_cmd=(python -m hdmole.bin.train)
if [ "${nnodes}" -gt 1 ]; then
    [ "${ngpu}" -ge 1 ] || die "--nnodes ${nnodes} needs --ngpu N >= 1 (processes per node)"
    [ -n "${MASTER_ADDR:-}" ] || die "--nnodes ${nnodes}: set MASTER_ADDR (host name of the node with NODE_RANK=0)"
    [[ "${NODE_RANK:-}" =~ ^[0-9]+$ ]] && [ "${NODE_RANK}" -lt "${nnodes}" ] \
        || die "--nnodes ${nnodes}: set NODE_RANK to this node's index, 0..$(( nnodes - 1 ))"
    train_cmd=(torchrun --nnodes "${nnodes}" --node-rank "${NODE_RANK}" --nproc-per-node "${ngpu}"
               --master-addr "${MASTER_ADDR}" --master-port "${MASTER_PORT:-29500}" -m hdmole.bin.train)
elif [ "${ngpu}" -gt 1 ]; then
    train_cmd=(torchrun --standalone --nproc-per-node "${ngpu}" -m hdmole.bin.train)
fi
[ -f "conf/model/${model}.yaml" ] || die "--model ${model}: no conf/model/${model}.yaml"
[ -f "conf/adapter/${adapter}.yaml" ] || die "--adapter ${adapter}: no conf/adapter/${adapter}.yaml ($(ls conf/adapter | sed 's/.yaml//' | tr '\n' ' '))"

if [ "${skip_setup}" = false ]; then
    tools/setup_env.sh
fi
. ./path.sh
. ./db.sh

if [ "${corpus}" = synthetic ]; then
    corpus_tag="synthetic_${size}"
    data_preset=synthetic
    [ -f "conf/data/synthetic_${size}.yaml" ] && data_preset="synthetic_${size}"  # e.g. small batches for ci
else
    corpus_tag="kespeech"
    data_preset=real
fi
data_root="data/${corpus_tag}"
[ -n "${exp_tag}" ] || exp_tag="${corpus_tag}_${model}"
exp_root="exp/${exp_tag}"
base_dir="${exp_root}/base_model"
adapt_dir="${exp_root}/${adapter}"
mkdir -p "${exp_root}"
echo "${cmdline}" >> "${exp_root}/run.sh.cmd"

# ---- configuration shared by every Python stage ---------------------------------------------
# shellcheck disable=SC2206
common_overrides=(model="${model}" data="${data_preset}" "data.corpus_dir=${data_root}/corpus"
    "data.manifest_dir=${data_root}/manifests" "data.cuts_dir=${data_root}/cuts" "data.num_jobs=${nj}"
    "data.feature_dir=${data_root}/fbank")
if [ "${corpus}" = synthetic ]; then
    # The frozen encoder's outputs once per cut set (KeSpeech's would need ~0.7 TB: off there).
    common_overrides+=(data.synthetic=true "data.synthetic_size=${size}" "data.synthetic_seed=${seed}"
        "data.encoder_cache_dir=${data_root}/encoder_out")
else
    common_overrides+=(data.synthetic=false "data.kespeech_dir=${KESPEECH}" "data.aishell_dir=${AISHELL}")
fi
if [ "${model}" = tiny ]; then
    common_overrides+=("model.encoder_dir=${data_root}/tiny/whisper" "model.llm_dir=${data_root}/tiny/qwen")
elif [ "${model}" = paper ]; then  # local checkpoint directories named in db.sh
    common_overrides+=("model.encoder_dir=${WHISPER_LARGE_V3}" "model.llm_dir=${QWEN2_7B}")
fi

# Stage 3's overrides, for sweeps over the same data and base (recipes/paper_comparison.sh).
adapt_overrides() {
    [ -f "${base_dir}/model/done" ] || die "no finished base model in ${base_dir}: run stage 2"
    mapfile -t base_model_args < <(python -m hdmole.bin.pretrained base-overrides "${base_dir}")
    adapt_args=("${common_overrides[@]}" "${base_model_args[@]}" experiment=adapt "train.init_from=${base_dir}")
}
if [ "${print_overrides}" = true ]; then
    adapt_overrides
    printf '%s\n' "${adapt_args[@]}"
    exit 0
fi

# run_stage MARKER KEY CMD...: run CMD unless MARKER holds KEY; write MARKER only on success.
run_stage() {
    local marker="$1" key="$2"
    shift 2
    if [ -f "${marker}" ] && [ "$(cat "${marker}")" = "${key}" ]; then
        log "up to date, skipped (${marker})"
        return 0
    fi
    rm -f "${marker}"
    log "running: $*"
    "$@"
    mkdir -p "$(dirname "${marker}")"
    printf '%s\n' "${key}" > "${marker}.tmp"
    mv "${marker}.tmp" "${marker}"
}

# Stages 2-4 are also keyed on the YAML presets they compose, so that an edited preset redoes
# them (and only them: editing an adapter preset does not retrain the base).
conf_hash() { echo "conf=$(cat "$@" | sha256sum | cut -c1-12)"; }
data_confs=(conf/config.yaml conf/data/*.yaml "conf/model/${model}.yaml")
base_hash="$(conf_hash "${data_confs[@]}" conf/train/base.yaml conf/train/paper.yaml conf/experiment/base_*.yaml)"
adapt_hash="$(conf_hash "${data_confs[@]}" "conf/adapter/${adapter}.yaml" conf/train/adapt.yaml conf/experiment/adapt.yaml)"
decode_hash="$(conf_hash conf/decode/*.yaml)"

want() { [ "${stage}" -le "$1" ] && [ "${stop_stage}" -ge "$1" ]; }

stage_time() { log "stage $1 done in $(( SECONDS - $2 )) s"; }

# ---- stage 0: corpus ------------------------------------------------------------------------
if want 0; then
    t0=${SECONDS}
    log "stage 0: corpus (${corpus_tag}) and lhotse manifests"
    data_key="$(python -m hdmole.bin.prepare corpus-id "${common_overrides[@]}")"
    run_stage "${data_root}/.done/stage0" "${data_key}" \
        python -m hdmole.bin.prepare corpus "${common_overrides[@]}"
    stage_time 0 "${t0}"
fi

# ---- stage 1: cut sets, statistics, features, tokenizer + tiny checkpoints --------------------
if want 1; then
    t0=${SECONDS}
    log "stage 1: normalise/filter, cut sets, statistics, features"
    run_stage "${data_root}/.done/stage1" "cuts $(cat "${data_root}/.done/stage0" 2>/dev/null)" \
        python -m hdmole.bin.prepare cuts "${common_overrides[@]}"
    if [ "${model}" = tiny ]; then
        run_stage "${data_root}/.done/stage1_tiny" "tiny text_steps=${lm_text_steps} $(cat "${data_root}/.done/stage1")" \
            python -m hdmole.bin.prepare tiny --text-steps "${lm_text_steps}" "${common_overrides[@]}"
    fi
    # Whisper log-mel in lhotse's storage, with the mel bins of model.encoder_dir (data.feature_storage;
    # nothing for on-the-fly presets).
    run_stage "${data_root}/.done/stage1_features_${model}" \
        "features $(conf_hash conf/data/*.yaml "conf/model/${model}.yaml") $(cat "${data_root}/.done/stage1")" \
        python -m hdmole.bin.prepare features "${common_overrides[@]}"
    stage_time 1 "${t0}"
fi

# ---- stage 2: base model --------------------------------------------------------------------
if want 2; then
    t0=${SECONDS}
    log "stage 2: base model (${base_dir})"
    if [ "${train_base}" = true ]; then
        rm -rf "${exp_root}/.done/stage2" "${exp_root}/.done/stage2_encoder" "${base_dir}" \
            "${exp_root}/base_model_encoder"  # retrain from scratch on request
    fi
    corpus_key="$(cat "${data_root}/.done/stage0" 2>/dev/null || true)"
    # A base trained here is keyed on its input (the tiny checkpoints or the cut sets) and settings.
    base_input="${data_root}/.done/stage1"
    if [ "${model}" = tiny ]; then base_input="${data_root}/.done/stage1_tiny"; fi
    [ -f "${base_input}" ] || die "no ${base_input}: run stage 1"
    base_key="$(cat "${base_input}") ${base_hash} ${base_args}"
    # The existing base, the shipped one or one trained here: decided once (docs/base_model.md).
    plan="$(python -m hdmole.bin.pretrained plan-base "--train-base=${train_base}" "--model=${model}" \
        "--pretrained=${pretrained}" "--corpus=${corpus_key}" "--base-dir=${base_dir}" \
        "--marker=${exp_root}/.done/stage2" "--key=${base_key}")"
    log "base model: ${plan%% *} (${plan#* })"
    case "${plan%% *}" in
        existing) ;;  # plan-base checked that it is finished
        shipped)
            run_stage "${exp_root}/.done/stage2" "pretrained $(cat "${pretrained}"/CORPUS_VERSION "${pretrained}"/*.json \
                "${pretrained}"/*.safetensors "${pretrained}"/*/*.safetensors | sha256sum | cut -c1-16) ${corpus_key}" \
                python -m hdmole.bin.pretrained install "${pretrained}" "${base_dir}" "${common_overrides[@]}" \
                --corpus "${corpus_key}"
            ;;
        train)
            if [ "${model}" = tiny ]; then
                # (a) encoder + CTC head; (b) encoder frozen, projector + LLM (staged: docs/base_model.md).
                # shellcheck disable=SC2086
                run_stage "${exp_root}/.done/stage2_encoder" "${base_key}" "${train_cmd[@]}" "${common_overrides[@]}" \
                    experiment=base_encoder "exp_dir=${exp_root}/base_model_encoder" ${base_args}
                # shellcheck disable=SC2086
                run_stage "${exp_root}/.done/stage2" "${base_key}" "${train_cmd[@]}" "${common_overrides[@]}" \
                    experiment=base_llm "exp_dir=${base_dir}" "train.init_from=${exp_root}/base_model_encoder" ${base_args}
            else
                # shellcheck disable=SC2086
                run_stage "${exp_root}/.done/stage2" "${base_key}" "${train_cmd[@]}" "${common_overrides[@]}" \
                    experiment=base_projector "exp_dir=${base_dir}" ${base_args}
            fi
            ;;
        *) die "unexpected base plan: ${plan}" ;;
    esac
    stage_time 2 "${t0}"
fi

# ---- stage 3: adaptation --------------------------------------------------------------------
if want 3; then
    t0=${SECONDS}
    log "stage 3: adaptation adapter=${adapter} (${adapt_dir})"
    adapt_overrides  # data, the base's own encoder/LLM directories and projector shape
    # shellcheck disable=SC2086
    run_stage "${exp_root}/.done/stage3_${adapter}" "$(cat "${base_dir}/model/done") ${adapt_hash} ${train_args}" \
        "${train_cmd[@]}" "${adapt_args[@]}" "adapter=${adapter}" "exp_dir=${adapt_dir}" ${train_args}
    stage_time 3 "${t0}"
fi

# ---- stage 4: decoding ----------------------------------------------------------------------
if want 4; then
    t0=${SECONDS}
    log "stage 4: decoding every test set (${adapt_dir}/decode)"
    # shellcheck disable=SC2086
    run_stage "${exp_root}/.done/stage4_${adapter}" "$(cat "${adapt_dir}/model/done" 2>/dev/null) ${decode_hash} ${decode_args}" \
        python -m hdmole.bin.decode "exp_dir=${adapt_dir}" ${decode_args}
    stage_time 4 "${t0}"
fi

# ---- stage 5: scoring -----------------------------------------------------------------------
if want 5; then
    t0=${SECONDS}
    log "stage 5: scoring (${adapt_dir}/RESULTS.md)"
    run_stage "${exp_root}/.done/stage5_${adapter}" "$(cat "${exp_root}/.done/stage4_${adapter}" 2>/dev/null)" \
        python -m hdmole.bin.score "${adapt_dir}" --name "${adapter}"
    stage_time 5 "${t0}"
    cat "${adapt_dir}/RESULTS.md"
fi
log "finished stages ${stage}-${stop_stage} (${SECONDS} s)"
