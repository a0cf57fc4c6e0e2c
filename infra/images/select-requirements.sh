#!/bin/sh
# Print the requirement lines one install step of a function image takes from
# requirements.txt, the one list of pinned runtime dependencies. The file has two parts,
# split by a comment line starting "# --- per image":
#   - above it, what every function imports: installed in one layer every image shares;
#   - below it, packages only some functions import: an image installs those its
#     build_args name in PIP_EXTRAS (stack.yml), in a layer of its own.
#
#   sh select-requirements.sh requirements.txt            # the shared part
#   sh select-requirements.sh requirements.txt pillow ...  # only the named per-image lines
#
# Fails (exit 2) when a name is not a per-image package of requirements.txt.
set -eu

req=${1:?usage: select-requirements.sh requirements.txt [per-image-package ...]}
shift

# The package name of a requirement line: up to the first version/extras/marker character.
name_of() { printf '%s\n' "$1" | sed -e 's/[[:space:]]*#.*$//' -e 's/[][<>=!~;[:space:]].*$//' | tr 'A-Z_' 'a-z-'; }

part=shared
found=""
while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in "# --- per image"*) part=per-image; continue ;; esac
    name=$(name_of "$line")
    [ -z "$name" ] && continue
    if [ $# -eq 0 ]; then
        [ "$part" = shared ] && printf '%s\n' "$line"
        continue
    fi
    [ "$part" = per-image ] || continue
    for wanted in "$@"; do
        if [ "$wanted" = "$name" ]; then printf '%s\n' "$line"; found="$found $name"; fi
    done
done < "$req"

if [ "$part" != per-image ]; then
    echo "select-requirements: $req has no '# --- per image' line" >&2
    exit 2
fi
for wanted in "$@"; do
    case " $found " in *" $wanted "*) ;; *)
        echo "select-requirements: $wanted is not one of the per-image packages of $req" >&2
        exit 2 ;;
    esac
done
