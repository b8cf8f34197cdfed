#!/usr/bin/env bash
# Training on this machine's CPU: the tiny task by default, optionally on simulated devices
# (XLA's host-platform device count) and as several local processes joined by jax.distributed
# on 127.0.0.1, a rehearsal of a multi-host launch. See docs/launch.md.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/local_cpu.sh [--config FILE ...] [--run-dir DIR] [options] [-- ktae-train args]

Runs  ktae-train --config FILE... --run-dir DIR [--max-steps N] [ktae-train args]  on the CPU.
With --processes P > 1, starts P processes on 127.0.0.1 (each with --devices simulated devices),
  ktae-train ... --coordinator 127.0.0.1:PORT --num-processes P --process-id I
and waits for all of them; process 0 writes the run directory.

Options:
  --config FILE        ktae-train YAML, repeatable (default: configs/tiny.yaml)
  --run-dir DIR        run directory (default: runs/local_cpu); reruns resume
  --max-steps N        stop after N training steps
  --devices N          simulated CPU devices per process (default: 1)
  --processes P        local processes (default: 1)
  --port N             coordinator port for --processes > 1 (default: 12355)
  --python PY          Python holding ktae-jax (default: .venv/bin/python of this checkout, else python3)
  --dry-run            print the commands without running them
  -h, --help           this help
USAGE
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
# shellcheck source=launch/_common.sh
source "$here/_common.sh"

run_dir="runs/local_cpu" max_steps="" devices=1 processes=1 port=12355 python=""
configs=() train_args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --config) need_value "$1" $# "${2:-}"; configs+=("$2"); shift 2 ;;
    --run-dir) need_value "$1" $# "${2:-}"; run_dir=$2; shift 2 ;;
    --max-steps) need_value "$1" $# "${2:-}"; max_steps=$2; shift 2 ;;
    --devices) need_value "$1" $# "${2:-}"; devices=$2; shift 2 ;;
    --processes) need_value "$1" $# "${2:-}"; processes=$2; shift 2 ;;
    --port) need_value "$1" $# "${2:-}"; port=$2; shift 2 ;;
    --python) need_value "$1" $# "${2:-}"; python=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; train_args=("$@"); break ;;
    *) die "unknown argument '$1'" ;;
  esac
done

[[ ${#configs[@]} -gt 0 ]] || configs=("$root/configs/tiny.yaml")
for c in "${configs[@]}"; do need_file --config "$c"; done
[[ -z $max_steps ]] || need_int --max-steps "$max_steps" 1
need_int --devices "$devices" 1
need_int --processes "$processes" 1
need_int --port "$port" 1
(( port <= 65535 )) || die "--port must be <= 65535, got $port"
if [[ -z $python ]]; then
  if [[ -x $root/.venv/bin/python ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi

cmd=("$python" -m ktae_jax.cli.train)
for c in "${configs[@]}"; do cmd+=(--config "$c"); done
cmd+=(--run-dir "$run_dir")
[[ -z $max_steps ]] || cmd+=(--max-steps "$max_steps")
env_vars=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$devices")

if (( processes == 1 )); then
  run env "${env_vars[@]}" "${cmd[@]}" "${train_args[@]}"
  exit 0
fi
# Several processes: gloo carries the CPU collectives between them.
env_vars+=(JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo)
pids=()
for (( i = 0; i < processes; i++ )); do
  proc_cmd=(env "${env_vars[@]}" "${cmd[@]}" --coordinator "127.0.0.1:$port" --num-processes "$processes"
            --process-id "$i" "${train_args[@]}")
  if [[ $DRY_RUN == 1 ]]; then
    show "${proc_cmd[@]}"
  else
    show "${proc_cmd[@]}"
    "${proc_cmd[@]}" &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
