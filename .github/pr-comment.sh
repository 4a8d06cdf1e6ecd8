#!/usr/bin/env bash
# Print, as Markdown, this branch's results against BASE (default: main): a table of each
# variant's test accuracy and train time, then the full metrics and params diffs, collapsed.
# The pull-request workflow posts this as a comment; run it locally to preview it.
#   .github/pr-comment.sh [BASE]
set -euo pipefail
exec python -m resnet_cifar.pr_comment "$@"
