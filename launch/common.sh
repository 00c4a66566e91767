# shellcheck shell=bash
# Sourced by the launch scripts (run from the repository root): their --help, their errors,
# and what --dry-run prints.

# the script's header comment, from its second line to the first blank one
usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; }
die() { echo "$(basename "$0"): $*" >&2; exit 2; }

# "+" and the words, each quoted to be pasted (no newline: a caller may add a redirection)
print_cmd() {
  printf '+'
  printf ' %q' "$@"
}

# prints the command under --dry-run ($dry_run = 1), runs it otherwise
run_cmd() {
  if [ "${dry_run:-0}" = 1 ]; then
    print_cmd "$@"
    printf '\n'
  else
    "$@"
  fi
}

# the project's .venv interpreter (absolute), else python3
venv_python() {
  if [ -x .venv/bin/python ]; then echo "$PWD/.venv/bin/python"; else echo python3; fi
}
