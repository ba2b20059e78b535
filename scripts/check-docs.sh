#!/usr/bin/env bash
# Checks the documentation (run by ctest as docs_check, and by hand):
#  1. README.md's quick start, the ```c++ block after the line
#     "<!-- quickstart: examples/quickstart.cc ... -->", is that file verbatim;
#  2. every relative link in the Markdown files (README.md, docs/, bench/,
#     examples/) names a file or directory that exists, and its #anchor, if
#     any, a heading of that file.
# Usage: scripts/check-docs.sh [REPO_ROOT]   (default: this script's repo)
set -euo pipefail
root=${1:-"$(dirname "$0")/.."}
cd "$root"
fail=0

block=$(awk '
  /^<!-- quickstart: examples\/quickstart.cc/ { marker = 1; next }
  marker && !inside && /^```c\+\+$/ { inside = 1; next }
  inside && /^```$/ { exit }
  inside { print }' README.md)
if [ -z "$block" ]; then
  echo "check-docs: README.md has no quick start block after its quickstart marker"
  fail=1
elif ! diff -u examples/quickstart.cc <(printf '%s\n' "$block") >/tmp/check-docs.$$.diff; then
  echo "check-docs: README.md's quick start differs from examples/quickstart.cc:"
  cat /tmp/check-docs.$$.diff
  fail=1
fi
rm -f /tmp/check-docs.$$.diff

# The anchors GitHub gives a Markdown file's headings: lower case, without
# punctuation other than '-' and '_', spaces as '-'.
headings() {
  awk '/^```/ { code = !code; next } !code && /^#+ / { sub(/^#+ /, ""); print }' "$1" |
    tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9 _-]//g; s/ /-/g'
}

mapfile -t files < <(find README.md docs bench examples -name '*.md' 2>/dev/null | sort)
for f in "${files[@]}"; do
  dir=$(dirname "$f")
  # Inline links [text](target), outside fenced code blocks.
  while IFS= read -r link; do
    link=${link%% *}
    case "$link" in
      http://* | https://* | mailto:*) continue ;;
    esac
    target=${link%%#*}
    anchor=
    [ "$target" = "$link" ] || anchor=${link#*#}
    path=$f
    [ -z "$target" ] || path=$(realpath -m --relative-to=. "$dir/$target")
    if [ -e "$path" ]; then
      # An #anchor must be a heading of the target, as GitHub names them.
      if [ -n "$anchor" ] && [ -f "$path" ] &&
         ! headings "$path" | grep -qxF -- "$anchor"; then
        echo "check-docs: $f links to $link, but $path has no such heading"
        fail=1
      fi
      continue
    fi
    echo "check-docs: $f links to $target, which does not exist ($path)"
    fail=1
  done < <(awk '/^```/ { code = !code; next } !code' "$f" |
           grep -oE '\]\([^)]+\)' | sed -E 's/^\]\((.*)\)$/\1/')
done

if [ "$fail" = 0 ]; then
  echo "check-docs: quick start matches; ${#files[@]} Markdown files, every relative link resolves"
fi
exit "$fail"
