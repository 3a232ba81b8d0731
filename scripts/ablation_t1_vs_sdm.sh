#!/usr/bin/env bash
# Issue 11: "T1+SDM above T1-only" measured again on today's cohorts (the earlier ablation, README "The previous
# student and the ablations", used skull-stripped MNI152 subjects only and 800 steps).
#
# Two students trained FROM SCRATCH with the same recipe, the same cases, the same seed and the same number of
# steps; the only difference is the input: T1 alone, or T1 + the SDM of the foundation masks (band 5, the shipped
# variant). Training cases: localised heads of both templates (template and GMM contrast), skull-stripped MNI152
# GMM subjects and the wide-volume subjects of both templates (the cohorts of reproduce_training.sh steps 9 and 11,
# regenerated from their seeds if missing); the foundation cache with the shipped prompter and the 3-slice context,
# as inference runs it. Both are scored uncalibrated and calibrated (each on the independent validation cohort,
# seeds 131-133), with the shipped student next to them, on the held-out cohorts (seeds 901, 902, 911).
# Usage: bash scripts/ablation_t1_vs_sdm.sh [WORK_DIR] [STEPS]     (default: ./runs, 2000 steps; about 1.4 h on 2 cores)
# (Its localised cohorts are made with the rigid localisation, as they were on 2026-12-06; inference localises
# with an affine transform since 2026-12-07: README "Results".)
set -euo pipefail
cd "$(dirname "$0")/.."
W="${1:-runs}"; STEPS="${2:-2000}"
B=.venv/bin/basalseg
C="$W/cohorts"; A="$W/train_abl"
mkdir -p "$C"
synth() { [ -f "$C/$1/dataset.json" ] || $B synth --out "$C/$1" "${@:2}"; }
# cohorts, two at a time
{ synth train_lhead_tpl --n 10 --seed 121 --template mni152 --template icbm2009c --contrast template --head --localised --localise-transform rigid --prefix lhead_tpl
  synth heldout_head --n 8 --seed 911 --template mni152 --template icbm2009c --contrast t1_gmm --head --prefix head
  [ -f "$C/heldout_head_localised/dataset.json" ] || .venv/bin/python -c "from basalseg.data.localised import localise_cohort as l; l('$C/heldout_head', '$C/heldout_head_localised', transform='rigid')"
} &
{ synth train_lhead_gmm --n 10 --seed 122 --template mni152 --template icbm2009c --contrast t1_gmm --head --localised --localise-transform rigid --prefix lhead_gmm
  synth train_gmm8 --n 8 --seed 102 --template mni152 --contrast t1_gmm --prefix train_gmm
  synth train_wide --n 8 --seed 151 --template mni152 --template icbm2009c --contrast t1_gmm --structure-volume-range 0.25 --prefix train_wide
  synth heldout_mni_seed --n 10 --seed 901 --template mni152 --contrast template --prefix heldout_mni_seed
  synth heldout_icbm --n 10 --seed 902 --template icbm2009c --contrast template --prefix heldout_icbm
  synth val_lhead --n 4 --seed 131 --template mni152 --template icbm2009c --contrast t1_gmm --head --localised --localise-transform rigid --prefix val_lhead
  synth val_icbm --n 2 --seed 132 --template icbm2009c --contrast template --prefix val_icbm
  synth val_mni --n 2 --seed 133 --template mni152 --contrast t1_gmm --prefix val_mni
} &
wait
T="--cohort $C/train_lhead_tpl --cohort $C/train_lhead_gmm --cohort $C/train_gmm8 --cohort $C/train_wide --work $A --val 4 --seed 0"
mkdir -p "$A/prompter" && cp -n BasalSegSAM/basalseg/weights/prompter.pt "$A/prompter/prompter.pt"
$B train $T --threads 2 --stage prepare
$B train $T --threads 1 --stage cache --jitter 2 --context --shard 0/2 & $B train $T --threads 1 --stage cache --jitter 2 --context --shard 1/2; wait
S="--stage student --context --student-steps $STEPS --max-minutes 60 --steps-per-epoch 100 --patch 80 --resume --threads 1 --mirror 0.5"
( time $B train $T $S --mode t1 ) > "$A/t1.log" 2>&1 & ( time $B train $T $S --mode sdm --band 5 ) > "$A/sdm.log" 2>&1; wait
S_T1="$A/student-t1-litemedsam/student.pt"; S_SDM="$A/student-sdm-band5-litemedsam/student.pt"
V="--cohort $C/val_lhead --cohort $C/val_icbm --cohort $C/val_mni"
PR=BasalSegSAM/basalseg/weights/prompter.pt
$B calibrate $V --work "$W/eval_val" --prompter "$PR" --student "$S_T1" --out "$A/t1_cal.pt" --overwrite --threads 2
$B calibrate $V --work "$W/eval_val" --prompter "$PR" --student "$S_SDM" --out "$A/sdm_cal.pt" --overwrite --threads 2
$B evaluate-cohort --cohort "$C/heldout_mni_seed" --cohort "$C/heldout_icbm" --cohort "$C/heldout_head_localised" --work "$W/eval3" \
  --prompter "$PR" --threads 2 \
  --student "T1+SDM band 5, scratch, calibrated=$A/sdm_cal.pt" --student "T1 only, scratch, calibrated=$A/t1_cal.pt" \
  --student "T1+SDM band 5, scratch, uncalibrated=$S_SDM" --student "T1 only, scratch, uncalibrated=$S_T1" \
  --student "shipped=BasalSegSAM/basalseg/weights/student_litemedsam.pt" --out "$W/report_abl"
