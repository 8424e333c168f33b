#!/usr/bin/env bash
# Ray Serve for the bare GPU machine (Python 3.12, no internet), in two sets that each fit one `run` call.
#
# Ray's wheel alone (79 MB) is over the 64 MiB a call may carry, so it is cut in two; the rest of ray[serve]'s
# dependencies go with the second part. The sets live in .whl-ray/ (git-ignored), NOT in .whl/: every other GPU
# action carries .whl whole, and 100 MiB of Ray there would put all of them over the limit.
#
#   here:         bench/scale_wheels.sh build      download, cut, arrange: .whl-ray/a (~58 MiB), .whl-ray/b (~43 MiB)
#   GPU, call 1:  bench/scale_wheels.sh stash      (carry .whl-ray/a) copies the set to /tmp/ray-wheels
#   GPU, call 2:  bench/scale_wheels.sh stash install   (carry .whl-ray/b) the same, then installs ray[serve]
#   GPU, call 3:  bench/gpu_run.sh scale:ARGS      (carry .whl as usual) `install` again is a no-op
# /tmp survives between calls only while the machine stays warm (30 s after a call): make the calls back to back.
#
# Left out on purpose (the GPU image has them and ray[serve] asks only for old versions): numpy (>=1.20),
# grpcio (>=1.42), uvloop (>=0.15.1). If pip says one of them is missing there, take it out of SKIP and build again.
set -euo pipefail
cd "$(dirname "$0")/.."
RAY_VERSION=2.60.0
SETS=.whl-ray
STASH=/tmp/ray-wheels
SKIP='^(numpy|grpcio|uvloop)-'
# grpcio stays the machine's own (1.84.0 on 2026-11-22), so grpcio-reflection must be its twin: the newest one asks
# for grpcio >= its own version and pip refused the install (seen on the two-H200 machine).
GPU_GRPCIO=1.84.0
PART_A_BYTES=$((58 * 1024 * 1024))

build() {
    local dl
    dl=$(mktemp -d)
    python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
        --platform manylinux1_x86_64 -d "$dl" "ray[serve]==$RAY_VERSION"
    rm -rf "$SETS"
    mkdir -p "$SETS/a" "$SETS/b"
    local ray
    ray=$(ls "$dl"/ray-"$RAY_VERSION"-*.whl)
    # The whole wheel's checksum, to check the pieces once they are joined again on the GPU machine.
    (cd "$dl" && sha256sum "$(basename "$ray")") > "$SETS/b/ray-wheel.sha256"
    head -c "$PART_A_BYTES" "$ray" > "$SETS/a/$(basename "$ray").part1"
    tail -c +$((PART_A_BYTES + 1)) "$ray" > "$SETS/b/$(basename "$ray").part2"
    for f in "$dl"/*.whl; do
        name=$(basename "$f")
        [[ "$name" == ray-"$RAY_VERSION"-* ]] && continue
        [[ "$name" =~ $SKIP ]] && continue
        cp "$f" "$SETS/b/"
    done
    rm -f "$SETS"/b/grpcio_reflection-*.whl
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$SETS/b" "grpcio-reflection==$GPU_GRPCIO"
    rm -rf "$dl"
    du -sh "$SETS/a" "$SETS/b"
    echo "carry .whl-ray/a in one call and .whl-ray/b in the next (bench/NOTES.md, 'Ray Serve on the GPU machine')"
}

stash() {
    mkdir -p "$STASH"
    local n=0
    for d in "$SETS"/a "$SETS"/b; do
        [ -d "$d" ] || continue
        cp "$d"/* "$STASH"/ && n=$((n + 1))
    done
    [ "$n" -gt 0 ] || { echo "no .whl-ray/a or .whl-ray/b here: name one in the call's carry" >&2; return 1; }
    echo "stashed: $(ls "$STASH" | wc -l) files, $(du -sh "$STASH" | cut -f1) in $STASH"
}

install() {
    if python3 -c "import ray, ray.serve; assert ray.__version__ == '$RAY_VERSION'" 2>/dev/null; then
        echo "ray[serve] $RAY_VERSION is installed"
        return 0
    fi
    local part1 part2 wheel
    part1=$(ls "$STASH"/ray-"$RAY_VERSION"-*.whl.part1 2>/dev/null || true)
    part2=$(ls "$STASH"/ray-"$RAY_VERSION"-*.whl.part2 2>/dev/null || true)
    if [ -z "$part1" ] || [ -z "$part2" ] || [ ! -f "$STASH/ray-wheel.sha256" ]; then
        echo "ray[serve] is not installed and $STASH lacks$([ -z "$part1" ] && echo ' set a (.whl-ray/a)')$([ -z "$part2" ] && echo ' set b (.whl-ray/b)'):" >&2
        echo "  run 'bench/scale_wheels.sh stash' in calls carrying .whl-ray/a, then .whl-ray/b, back to back" >&2
        return 1
    fi
    wheel="${part1%.part1}"
    cat "$part1" "$part2" > "$wheel"
    (cd "$STASH" && sha256sum -c ray-wheel.sha256) || { echo "the joined Ray wheel is damaged: stash both sets again" >&2; return 1; }
    # Against what the machine already has: only what is missing (or too old) is installed from the stash.
    python3 -m pip install -q --no-index --find-links "$STASH" --no-cache-dir "ray[serve]==$RAY_VERSION"
    python3 -c "import ray, ray.serve; print('ray[serve]', ray.__version__, 'installed')"
}

[ $# -gt 0 ] || { sed -n '2,20p' "$0"; exit 2; }
for what in "$@"; do
    case "$what" in
        build) build ;;
        stash) stash ;;
        install) install ;;
        *) echo "unknown step $what: build, stash, install" >&2; exit 2 ;;
    esac
done
