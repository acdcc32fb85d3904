# shellcheck shell=bash
# Corpus roots for real data (sourced by run.sh). Point them at your copies; nothing is
# downloaded. Layouts checked by stage 0:
#   KESPEECH: <root>/Tasks/ASR/<part>/{wav.scp,text,utt2subdialect,utt2spk} and <root>/Audio/...
#   AISHELL:  <root>/data_aishell/transcript/aishell_transcript_v0.8.txt, <root>/data_aishell/wav/...
KESPEECH="${KESPEECH:-/data/corpora/KeSpeech}"
AISHELL="${AISHELL:-/data/corpora/aishell}"
# Paper-scale checkpoints (local Hugging Face directories) for --model paper.
WHISPER_LARGE_V3="${WHISPER_LARGE_V3:-/data/models/whisper-large-v3}"
QWEN2_7B="${QWEN2_7B:-/data/models/Qwen2-7B-Instruct}"
export KESPEECH AISHELL WHISPER_LARGE_V3 QWEN2_7B
