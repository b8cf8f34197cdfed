#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create (or reuse) it, install the pinned package on every
# worker, run ktae-train on all workers at once, with the run directory (checkpoints, metrics,
# logs) in a GCS bucket mounted on every worker. See docs/launch.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name NAME --zone ZONE --accelerator TYPE --bucket BUCKET
                         --config FILE [--config FILE ...] [options] [-- ktae-train args]

Creates the TPU VM slice NAME if it does not exist (else reuses it), creates the bucket if it
does not exist, mounts it with gcsfuse at ~/gcs on every worker, installs jax[tpu] and the
pinned ktae-jax on every worker, and runs on all of them (--worker=all):
  ktae-train --config FILE... --run-dir ~/gcs/runs/RUN_NAME [ktae-train args]
JAX finds the other workers by itself on a TPU slice (no coordinator flags needed). Running the
same command again resumes the run from its latest checkpoint in the bucket.

Required:
  --name NAME          TPU VM name
  --zone ZONE          e.g. us-central2-b
  --accelerator TYPE   slice type, e.g. v4-32, v5p-128, v5litepod-16, v6e-16
  --bucket BUCKET      GCS bucket (gs://NAME or NAME) for the run directory and logs
  --config FILE        ktae-train YAML (repeat to merge, e.g. a recipe then a mesh file)

Options:
  --project ID         gcloud project (default: gcloud's configured project)
  --version RUNTIME    TPU VM software version (default: by generation: v4 tpu-ubuntu2204-base,
                       v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --run-name NAME      run folder under gs://BUCKET/runs/ (default: the first config's name)
  --wheel FILE         the ktae-jax wheel to install (default: built here from this checkout with
                       `pip wheel --no-deps`, so every worker runs exactly this version)
  --package SPEC       install this pip requirement instead of a wheel (e.g. ktae-jax==0.1.0)
  --jax-version V      jax[tpu] version (default: the version this checkout pins)
  --location REGION    bucket location when it is created (default: the zone's region)
  --spot               create the slice as Spot capacity
  --detach             start training in the background on the workers and return
  --no-check           skip the fit check (see --dry-run)
  --dry-run            print every command (gcloud, pip, ktae-train) without running any; only the
                       fit check runs: `ktae-train CONFIGS --compile-only --target TYPE` compiles the
                       run for the slice here and refuses a plan that does not fit (real runs too)
  -h, --help           this help

Everything after `--` goes to ktae-train, e.g. `-- model.path=/home/$USER/gcs/models/Qwen2.5-Math-1.5B`.
EOF
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
# shellcheck source=launch/_common.sh
source "$here/_common.sh"

name="" zone="" accelerator="" bucket="" project="" version="" run_name=""
package="" wheel="" jax_ver="" location="" spot=0 detach=0
configs=() train_args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --name) need_value "$1" $# "${2:-}"; name=$2; shift 2 ;;
    --zone) need_value "$1" $# "${2:-}"; zone=$2; shift 2 ;;
    --accelerator) need_value "$1" $# "${2:-}"; accelerator=$2; shift 2 ;;
    --bucket) need_value "$1" $# "${2:-}"; bucket=$2; shift 2 ;;
    --config) need_value "$1" $# "${2:-}"; configs+=("$2"); shift 2 ;;
    --project) need_value "$1" $# "${2:-}"; project=$2; shift 2 ;;
    --version) need_value "$1" $# "${2:-}"; version=$2; shift 2 ;;
    --run-name) need_value "$1" $# "${2:-}"; run_name=$2; shift 2 ;;
    --package) need_value "$1" $# "${2:-}"; package=$2; shift 2 ;;
    --wheel) need_value "$1" $# "${2:-}"; wheel=$2; shift 2 ;;
    --jax-version) need_value "$1" $# "${2:-}"; jax_ver=$2; shift 2 ;;
    --location) need_value "$1" $# "${2:-}"; location=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --detach) detach=1; shift ;;
    --no-check) NO_CHECK=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; train_args=("$@"); break ;;
    *) die "unknown argument '$1'" ;;
  esac
done

# ---------------------------------------------------------------- validate
[[ -n $name ]] || die "--name is required"
[[ -n $zone ]] || die "--zone is required"
[[ -n $accelerator ]] || die "--accelerator is required"
[[ -n $bucket ]] || die "--bucket is required"
[[ ${#configs[@]} -gt 0 ]] || die "--config is required"
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$name': lowercase letters, digits and '-', starting with a letter"
[[ $zone =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone '$zone' is not a zone (e.g. us-central2-b)"
[[ $accelerator =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] || die "--accelerator '$accelerator' is not a TPU type (e.g. v4-32, v5p-128)"
if [[ -z $version ]]; then
  # Cloud TPU's documented runtime per generation (a v4 image cannot boot a v5 or v6 slice).
  case ${accelerator%%-*} in
    v4) version=tpu-ubuntu2204-base ;;
    v5litepod|v5e) version=v2-alpha-tpuv5-lite ;;
    v5p) version=v2-alpha-tpuv5 ;;
    v6e) version=v2-alpha-tpuv6e ;;
    *) die "--accelerator '$accelerator': no known runtime for ${accelerator%%-*}; give --version" ;;
  esac
fi
bucket=${bucket#gs://}
bucket=${bucket%/}
[[ $bucket =~ ^[a-z0-9][-a-z0-9_.]{1,61}[a-z0-9]$ ]] || die "--bucket 'gs://$bucket' is not a valid bucket name"
for c in "${configs[@]}"; do need_file --config "$c"; done
[[ -z $wheel || -z $package ]] || die "give --package or --wheel, not both"
[[ -z $wheel ]] || need_file --wheel "$wheel"
run_name=${run_name:-$(basename "${configs[0]}" .yaml)}
[[ $run_name =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "--run-name '$run_name': letters, digits, '.', '_' and '-' only"
jax_ver=${jax_ver:-$(jax_version "$root")}
location=${location:-${zone%-*}}
if [[ $DRY_RUN != 1 ]] && ! command -v gcloud >/dev/null; then
  die "gcloud is not installed (https://cloud.google.com/sdk/docs/install)"
fi

gflags=(--zone "$zone")
[[ -z $project ]] || gflags+=(--project "$project")
tpu=(gcloud compute tpus tpu-vm)
# shellcheck disable=SC2088  # these paths expand on the workers, not here
remote_dir='~/ktae'
# shellcheck disable=SC2088
run_dir="~/gcs/runs/$run_name"

# ---------------------------------------------------------------- 0. does the plan fit the slice?
check_args=()
for c in "${configs[@]}"; do check_args+=(--config "$c"); done
fit_check "$accelerator" "${check_args[@]}" "${train_args[@]}"

# ---------------------------------------------------------------- 1. the slice and the bucket
if probe "${tpu[@]}" describe "$name" "${gflags[@]}"; then
  echo "reusing TPU VM $name"
else
  create=("${tpu[@]}" create "$name" "${gflags[@]}" --accelerator-type "$accelerator" --version "$version")
  [[ $spot == 0 ]] || create+=(--spot)
  run "${create[@]}"
fi
bucket_flags=()
[[ -z $project ]] || bucket_flags+=(--project "$project")
if ! probe gcloud storage buckets describe "gs://$bucket" "${bucket_flags[@]}"; then
  run gcloud storage buckets create "gs://$bucket" --location "$location" --uniform-bucket-level-access "${bucket_flags[@]}"
fi

# ---------------------------------------------------------------- 2. files for every worker
# The launch script each worker runs: written here, copied with the configs.
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
remote_configs=()
for c in "${configs[@]}"; do
  cp "$c" "$staging/"
  remote_configs+=(--config "$remote_dir/$(basename "$c")")
done
install_spec="'$package'"
if [[ -z $package ]]; then
  if [[ -z $wheel ]]; then
    # The pinned package: this checkout, built into a wheel (dependencies come from PyPI).
    run "${PYTHON:-python3}" -m pip wheel --no-deps --quiet --wheel-dir "$staging" "$root"
    wheel="$staging/ktae_jax-$(package_version "$root")-py3-none-any.whl"
  else
    cp "$wheel" "$staging/"
  fi
  install_spec="$remote_dir/$(basename "$wheel")"
fi
train_cmd=(ktae-train "${remote_configs[@]}" --run-dir "$run_dir" "${train_args[@]}")
{
  echo '#!/usr/bin/env bash'
  echo '# Written by launch/tpu_pod.sh: one worker of the slice trains (all workers run this).'
  echo 'set -euo pipefail'
  # shellcheck disable=SC2016  # expands on the worker
  echo 'export PATH="$HOME/.local/bin:$PATH"'
  echo "mkdir -p $run_dir/logs"
  echo "cd $remote_dir"
  echo "$(show "${train_cmd[@]}" | sed 's/^+ //') 2>&1 | tee -a $run_dir/logs/\$(hostname).log"
} > "$staging/train.sh"
setup=$(cat <<EOF
set -euo pipefail
if ! command -v gcsfuse >/dev/null; then
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo gpg --batch --yes --dearmor -o /usr/share/keyrings/cloud.google.gpg
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.gpg] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
fi
mkdir -p ~/gcs && (mountpoint -q ~/gcs || gcsfuse --implicit-dirs $bucket ~/gcs)
python3 -m pip install --user -q --upgrade pip
python3 -m pip install --user -q 'jax[tpu]==$jax_ver' $install_spec
EOF
)

ssh_all=("${tpu[@]}" ssh "$name" "${gflags[@]}" --worker=all)
run "${ssh_all[@]}" --command "mkdir -p $remote_dir"
files=("$staging"/*.yaml "$staging/train.sh")
[[ -z $wheel ]] || files+=("$staging/$(basename "$wheel")")
run "${tpu[@]}" scp "${files[@]}" "$name:$remote_dir/" "${gflags[@]}" --worker=all
if [[ $DRY_RUN == 1 ]]; then
  echo "# $remote_dir/train.sh (copied above):"
  sed 's/^/#   /' "$staging/train.sh"
fi

# ---------------------------------------------------------------- 3. install, then train on all workers
run "${ssh_all[@]}" --command "$setup"
if [[ $detach == 1 ]]; then
  run "${ssh_all[@]}" --command "nohup setsid bash $remote_dir/train.sh >/dev/null 2>&1 < /dev/null &"
  echo "training in the background; logs: gs://$bucket/runs/$run_name/logs/, metrics: gs://$bucket/runs/$run_name/metrics.jsonl"
else
  run "${ssh_all[@]}" --command "bash $remote_dir/train.sh"
fi
echo "run directory: gs://$bucket/runs/$run_name (mounted at $run_dir on the workers)"
