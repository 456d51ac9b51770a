#!/usr/bin/env bash
# Version-controlled checkpoints with git-theta: a base model and three fine-tunes on branches, their Fisher
# statistics tracked next to them, a `git merge` under TIES and a three-way Fisher merge committed by blockmerge.
# Run it in an empty directory; it needs git, git-lfs and blockmerge (which brings git-theta).
set -euo pipefail

git init -q -b main models
cd models
python3 -m blockmerge.gittheta install          # this repository's filter, merge driver and merge-message hook
git theta track '*.safetensors'                 # the model and its statistics (fisher.safetensors) are tracked

python3 -m blockmerge.gittheta.example ../family --tasks a b c   # a tiny base model and three fine-tunes
cp -r ../family/base/. .                          # a Hugging Face model directory: the repository's root
git add .
git commit -qm "Base model"

for task in a b c; do
    git switch -q -c "task-$task" main
    cp "../family/task-$task/model.safetensors" .
    mkdir -p data && cp "../family/task-$task.jsonl" data/
    blockmerge stats fisher --model . --data "data/task-$task.jsonl" --text-column prompt --target-column target \
        --num-examples 8 --batch-size 8 --out fisher.safetensors
    git add .
    git commit -qm "Fine-tune on task $task, with its Fisher"
done

# Any revision reads without a checkout, parameter by parameter.
blockmerge inspect task-b:model.safetensors

# `git merge` merges the models with the configured method: no prompt.
git switch -q -c ties-ab task-a
git config blockmerge.method ties
git config blockmerge.set.density 0.5
git config blockmerge.set.scaling-factor 1.0
git merge --no-edit task-b
git config --unset blockmerge.method             # back to git-theta's menu for later merges

# Three models at once, each with its Fisher at the same revision, committed with its provenance.
git switch -q -c fisher-abc main
blockmerge merge -q --method fisher --base main:model.safetensors \
    --model task-a:model.safetensors --model task-b:model.safetensors \
    --model task-c:model.safetensors \
    --stats 0=task-a:fisher.safetensors --stats 1=task-b:fisher.safetensors \
    --stats 2=task-c:fisher.safetensors \
    --out model.safetensors --commit -m "Fisher merge of tasks a, b and c"

git log --all --graph --format='%h %s%n%b'
