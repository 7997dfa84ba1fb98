#!/usr/bin/env bash
# Submits catalog-index to Google Cloud Dataflow with GPU workers (README "Running on Dataflow").
#
#   deploy/launch_dataflow.sh --catalog 'gs://B/catalog/*.parquet' --output gs://B/index [catalog-index options...]
#
# Settings come from the environment (defaults in brackets):
#   PROJECT, REGION [us-central1], TEMP_LOCATION [gs://$BUCKET/tmp], IMAGE (the SDK container, deploy/Dockerfile)
#   GPU_TYPE [nvidia-l4], GPUS_PER_WORKER [1], MACHINE_TYPE [g2-standard-8], DISK_GB [100]
#   MAX_WORKERS [4], PROCESS_MODE [per_gpu: one SDK process per GPU | threads: one process, N harness threads]
#   HARNESS_THREADS [4 when PROCESS_MODE=threads], USE_MPS [0: 1 turns on NVIDIA MPS so processes share a GPU]
#   PYTHON [python: the launcher environment, with apache-beam[gcp]]
#   MODE [direct: submit from here | flex: build the flex template spec | flex-run: run that template]
#   TEMPLATE_PATH [gs://$BUCKET/templates/catalog-index.json] for the flex modes; DRY_RUN=1 prints the command.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

: "${PROJECT:?set PROJECT to the Google Cloud project}"
: "${IMAGE:?set IMAGE to the SDK container built from deploy/Dockerfile (REGION-docker.pkg.dev/PROJECT/REPO/catalog-index:TAG)}"
REGION="${REGION:-us-central1}"
BUCKET="${BUCKET:-}"
TEMP_LOCATION="${TEMP_LOCATION:-${BUCKET:+gs://$BUCKET/tmp}}"
: "${TEMP_LOCATION:?set TEMP_LOCATION (gs://...) or BUCKET}"
GPU_TYPE="${GPU_TYPE:-nvidia-l4}"
GPUS_PER_WORKER="${GPUS_PER_WORKER:-1}"
MACHINE_TYPE="${MACHINE_TYPE:-g2-standard-8}"
DISK_GB="${DISK_GB:-100}"
MAX_WORKERS="${MAX_WORKERS:-4}"
PROCESS_MODE="${PROCESS_MODE:-per_gpu}"
USE_MPS="${USE_MPS:-0}"
MODE="${MODE:-direct}"
TEMPLATE_PATH="${TEMPLATE_PATH:-${BUCKET:+gs://$BUCKET/templates/catalog-index.json}}"

# The accelerator with its driver; MPS lets several SDK processes share one GPU without time-slicing.
accelerator="worker_accelerator=type:${GPU_TYPE};count:${GPUS_PER_WORKER};install-nvidia-driver"
if [ "$USE_MPS" = "1" ]; then accelerator="${accelerator};use_nvidia_mps"; fi

# Model copies: by default Dataflow starts one SDK process per vCPU, and each would load its own copy
# onto the one GPU. Both modes run one SDK process per worker VM (no_use_multiple_sdk_containers):
#  per_gpu: with one GPU, the process's harness threads share its single copy; with several GPUs, Beam's
#           shared model servers hold one copy per GPU (--model_copies_per_gpu=1), each on its own GPU
#           (round-robin placement), and the harness threads feed them all.
#  threads: like per_gpu with one GPU, with HARNESS_THREADS threads (more threads, more decode overlap).
process_flags=("--experiments=no_use_multiple_sdk_containers")
case "$PROCESS_MODE" in
  per_gpu) process_flags+=("--number_of_worker_harness_threads=$((4 * GPUS_PER_WORKER))")
           if [ "$GPUS_PER_WORKER" -gt 1 ]; then process_flags+=("--model_copies_per_gpu=1"); fi ;;
  threads) process_flags+=("--number_of_worker_harness_threads=${HARNESS_THREADS:-4}") ;;
  *) echo "PROCESS_MODE must be per_gpu or threads, got '$PROCESS_MODE'" >&2; exit 2 ;;
esac

beam_flags=(
  --runner=DataflowRunner
  --project="$PROJECT" --region="$REGION" --temp_location="$TEMP_LOCATION" --staging_location="$TEMP_LOCATION/staging"
  --experiments=use_runner_v2
  --sdk_container_image="$IMAGE" --sdk_location=container
  --dataflow_service_options="$accelerator"
  --worker_machine_type="$MACHINE_TYPE" --disk_size_gb="$DISK_GB" --max_num_workers="$MAX_WORKERS"
  "${process_flags[@]}"
)

run() { if [ "${DRY_RUN:-0}" = "1" ]; then printf '%q ' "$@"; echo; else "$@"; fi; }

case "$MODE" in
  direct)
    cd "$root"
    run "${PYTHON:-python}" -m pipeline.cli run --device cuda --precision bf16 "${beam_flags[@]}" --setup_file ./setup.py "$@"
    ;;
  flex)
    : "${TEMPLATE_PATH:?set TEMPLATE_PATH or BUCKET}"
    run gcloud dataflow flex-template build "$TEMPLATE_PATH" \
      --image "$IMAGE" --sdk-language PYTHON \
      --metadata-file "$root/deploy/flex_template_metadata.json"
    ;;
  flex-run)
    : "${TEMPLATE_PATH:?set TEMPLATE_PATH or BUCKET}"
    # template parameters: --parameters catalog=...,output=... (passed through as "$@")
    run gcloud dataflow flex-template run "catalog-index-$(date -u +%Y%m%d-%H%M%S)" \
      --template-file-gcs-location "$TEMPLATE_PATH" --project "$PROJECT" --region "$REGION" \
      --temp-location "$TEMP_LOCATION" --worker-machine-type "$MACHINE_TYPE" --max-workers "$MAX_WORKERS" \
      --additional-experiments "use_runner_v2,no_use_multiple_sdk_containers" \
      --additional-user-labels "app=catalog-index" \
      --parameters "sdk_container_image=$IMAGE,dataflow_service_options=$accelerator,disk_size_gb=$DISK_GB" "$@"
    ;;
  *) echo "MODE must be direct, flex or flex-run, got '$MODE'" >&2; exit 2 ;;
esac
