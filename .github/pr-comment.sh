#!/usr/bin/env bash
# Print, as Markdown, the metrics and params of this branch against BASE (default: main).
# The pull-request workflow posts this as a comment; run it locally to preview it.
#   .github/pr-comment.sh [BASE]
set -euo pipefail
base=${1:-main}

diff_or_none() {
  local table
  table=$("$@")
  echo "${table:-No changes.}"
}

echo "## Metrics: this branch vs \`$base\`"
echo
diff_or_none dvc metrics diff "$base" --md
echo
echo "## Params: this branch vs \`$base\`"
echo
diff_or_none dvc params diff "$base" --md
