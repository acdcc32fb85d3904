# shellcheck shell=bash
# Option parser for recipe scripts, sourced after the script has set its defaults
# (the Kaldi/ESPnet convention, re-implemented here):
#   --foo-bar VALUE  or  --foo_bar VALUE  or  --foo-bar=VALUE   sets the EXISTING variable foo_bar.
# An option naming no variable, a missing value, a non-boolean value for a variable whose
# default is true/false, or a positional argument is an error: the usage ($help_message) is
# printed and the script exits 2.  --help / -h prints the usage and exits 0.
# The parsed command line is kept in $cmdline for the experiment directory.

cmdline="$0"
for arg_ in "$@"; do cmdline+=" $(printf '%q' "${arg_}")"; done
unset arg_

_po_usage_error() {
    echo "$0: $*" >&2
    [ -n "${help_message:-}" ] && printf '%s\n' "${help_message}" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --help|-h)
            printf '%s\n' "${help_message:-no help message}"
            exit 0
            ;;
        --*=*)
            _po_name="${1%%=*}"
            _po_value="${1#*=}"
            shift
            ;;
        --?*)
            [ $# -ge 2 ] || _po_usage_error "option $1 needs a value"
            _po_name="$1"
            _po_value="$2"
            shift 2
            ;;
        *)
            _po_usage_error "unexpected argument '$1' (options only: --name value)"
            ;;
    esac
    _po_var="${_po_name#--}"
    _po_var="${_po_var//-/_}"
    # Only the script's own lower-case settings are options (never help_message, cmdline, ...).
    if ! [[ "${_po_var}" =~ ^[a-z][a-z0-9_]*$ ]] || [ -z "${!_po_var+set}" ] \
        || [ "${_po_var}" = help_message ] || [ "${_po_var}" = cmdline ]; then
        _po_usage_error "unknown option ${_po_name}"
    fi
    case "${!_po_var}" in
        true|false)
            case "${_po_value}" in
                true|false) ;;
                *) _po_usage_error "option ${_po_name} takes true or false, got '${_po_value}'" ;;
            esac
            ;;
    esac
    printf -v "${_po_var}" '%s' "${_po_value}"
done
unset _po_name _po_value _po_var
