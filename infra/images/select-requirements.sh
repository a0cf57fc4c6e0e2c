#!/bin/sh
# Print the requirements one function image installs: every line of requirements.txt
# except the packages only some images need, plus those named as arguments.
# requirements.txt stays the one list of pinned runtime dependencies; this only
# decides which image carries the heavy ones: ffmpeg's wheel (compress-video), the PDF
# glue (generate-pdf), Pillow (resize-image), uvicorn's uvloop and httptools
# (status-stream, the only ASGI server), jsonschema-rs (the gateway's compiled validators).
#
#   sh select-requirements.sh requirements.txt [extra-package ...]
#
# Fails when an extra is not one of those packages or not listed in requirements.txt.
set -eu
MEDIA_ONLY="imageio-ffmpeg pdfkit pillow uvloop httptools jsonschema-rs"

req=${1:?usage: select-requirements.sh requirements.txt [extra ...]}
shift

# The package name of a requirement line: up to the first version/extras/marker character.
name_of() { printf '%s\n' "$1" | sed -e 's/[[:space:]]*#.*$//' -e 's/[][<>=!~;[:space:]].*$//' | tr 'A-Z_' 'a-z-'; }

is_media() {
    for m in $MEDIA_ONLY; do [ "$1" = "$m" ] && return 0; done
    return 1
}

for extra in "$@"; do
    if ! is_media "$extra"; then
        echo "select-requirements: $extra is not one of the packages only some images carry ($MEDIA_ONLY)" >&2
        exit 2
    fi
done

found=""
while IFS= read -r line || [ -n "$line" ]; do
    name=$(name_of "$line")
    [ -z "$name" ] && continue
    case "$name" in -*) printf '%s\n' "$line"; continue ;; esac
    if is_media "$name"; then
        for extra in "$@"; do
            if [ "$extra" = "$name" ]; then printf '%s\n' "$line"; found="$found $name"; fi
        done
    else
        printf '%s\n' "$line"
    fi
done < "$req"

for extra in "$@"; do
    case " $found " in *" $extra "*) ;; *)
        echo "select-requirements: $extra is not listed in $req" >&2
        exit 2 ;;
    esac
done
