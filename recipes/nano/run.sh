#!/usr/bin/env bash
# A nano VIST2 trained from scratch on the public-domain corpora, tokenizer -> lm -> ocr -> olm -> sft,
# then evaluated on a held-out passage (recipes/nano/heldout.txt, not from the training corpora).
# About 50 minutes on a 2-core CPU (bench/notes/nano.md); set OUT to keep several runs apart.
# Status: the visual path stays alive (the page loss) but the model does not yet read (held-out
# OCR CER ~1.1-1.3, as with blank pages). Round 2 of bench/notes/nano.md: a 128-wide visual token
# cannot carry its 32 characters; the largest blind gap so far came from a 512-wide LLM on 16-token
# pages (ocr16.yaml), which is where the next recipe starts.
#   bash recipes/nano/run.sh            # runs/nano/{tok,init,lm,ocr,olm,sft,eval}
set -euo pipefail
OUT=${OUT:-runs/nano}
HERE=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
LM_STEPS=${LM_STEPS:-500} OCR_STEPS=${OCR_STEPS:-1200} OLM_STEPS=${OLM_STEPS:-250} SFT_STEPS=${SFT_STEPS:-100}
mkdir -p "$OUT"
stamp() { date +%s; }
t0=$(stamp)

[ -f "$OUT/data/text_en.jsonl" ] || vist2 data prepare --out "$OUT/data" --corpora kjv,web,chat --chats 500
vist2 tokenizer train --data "$OUT/data/text_en.jsonl" --vocab-size 1024 --out "$OUT/tok"
# the patch-aligned page: 8x8 patches hold two 4x8 px characters each, a 4x4 merge (beta 16, K 64);
# round 1 of bench/notes/nano.md ran --render nano9 with the default 16 px patches
vist2 init --preset tiny --render nano --vision-patch-size 8 --tokenizer "$OUT/tok" --out "$OUT/init" \
    --llm-hidden-size 128 --llm-layers 4 --llm-heads 4 --llm-kv-heads 2 --llm-intermediate-size 384 \
    --vision-hidden-size 128 --vision-layers 4 --vision-heads 4 --vision-intermediate-size 384
t1=$(stamp)
vist2 train --stage lm  --model "$OUT/init" --data "$OUT/data/text_en.jsonl" --out "$OUT/lm" \
    --config "$HERE/lm.yaml" --max-steps "$LM_STEPS"
t2=$(stamp)
vist2 train --stage ocr --model "$OUT/lm"   --data "$OUT/data/text_en.jsonl" --out "$OUT/ocr" \
    --config "$HERE/ocr.yaml" --max-steps "$OCR_STEPS"
t3=$(stamp)
vist2 train --stage olm --model "$OUT/ocr"  --data "$OUT/data/text_en.jsonl" --out "$OUT/olm" \
    --config "$HERE/olm.yaml" --max-steps "$OLM_STEPS"
t4=$(stamp)
vist2 train --stage sft --model "$OUT/olm"  --data "$OUT/data/sft.jsonl" --out "$OUT/sft" \
    --config "$HERE/sft.yaml" --max-steps "$SFT_STEPS"
t5=$(stamp)
mkdir -p "$OUT/eval"
for m in ocr olm sft; do
    vist2 eval ocr --model "$OUT/$m" --data "$HERE/heldout.txt" --ratios 4 --samples 20 --no-progress \
        --out "$OUT/eval/ocr-$m.json"
done
vist2 eval olm --model "$OUT/olm" --data "$HERE/heldout.txt" --context-tokens 128 --continuation-tokens 64 \
    --no-progress --out "$OUT/eval/olm.json"
echo "wall seconds: setup $((t1 - t0)), lm $((t2 - t1)), ocr $((t3 - t2)), olm $((t4 - t3)), sft $((t5 - t4)), " \
     "total $(($(stamp) - t0))" | tee "$OUT/wall.txt"
