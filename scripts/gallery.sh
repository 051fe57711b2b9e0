#!/usr/bin/env bash
# The README's gallery: four samples (seed 0, default settings) of two prompts per caption
# template, from the shipped demo checkpoint. Writes assets/gallery/NN.png.
set -euo pipefail
out=${1:-assets/gallery}
mkdir -p "$out"
i=0
while IFS= read -r prompt; do
  python sample.py "$prompt" --num 4 --out "$out/$(printf %02d $i).png" > /dev/null
  echo "$(printf %02d $i).png  $prompt"
  i=$((i + 1))
done <<'PROMPTS'
a red circle
a cyan triangle
a small blue square
a large yellow circle
a green triangle on the left
a purple square at the bottom
a red circle above a blue square
a yellow triangle to the right of a green circle
two purple circles
three cyan squares
a purple triangle to the left of a yellow square
PROMPTS
