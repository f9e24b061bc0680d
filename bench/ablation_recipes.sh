# The seven recipes of issue 17's 64-px ablation (item 5) as `ganscope train` flags, sourced by
# bench/ablation64.sh (CPU) and bench/gpu_check.sh (GPU). ORDER is the table's row order.
# shellcheck shell=bash disable=SC2034 # used by the scripts that source this file
ORDER=(g-only bce wgan-gp acgan sagan projection sequential)
declare -A ARGS=(
    [g-only]="--preset iclevr-cdcgan --set model.conditioning=g-only"
    [bce]="--preset iclevr-cdcgan"
    [wgan-gp]="--preset iclevr-wgan-gp"
    [acgan]="--preset iclevr-acgan"
    [sagan]="--preset iclevr-sagan"
    [projection]="--preset iclevr-projection"
    [sequential]="--preset iclevr-sequential"
)
