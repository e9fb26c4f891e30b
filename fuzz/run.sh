#!/usr/bin/env bash
# Builds every fuzz target and runs each for FUZZ_SECONDS (default 15) seconds, seeding the
# corpora from format-spec/vectors. Exits non-zero if any target crashes, fails an assertion,
# times out or runs out of memory; the reproducer is left in fuzz/artifacts/<target>/.
#
# Usage: fuzz/run.sh [target...]        (default: all targets)
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). Runs on stable Rust without a
# sanitizer (`--sanitizer none`); the decoders forbid unsafe code, so coverage-guided
# fuzzing with assertions is what finds their bugs.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
vectors="$here/../format-spec/vectors"
seconds="${FUZZ_SECONDS:-15}"
all_targets=(config cluster sealed pack pack_index chunk chunk_run manifest wal_object wal_name wal_page_header keys lease gc_state
    replication_stream)
if [ "$#" -gt 0 ]; then targets=("$@"); else targets=("${all_targets[@]}"); fi

cd "$here"
command -v cargo-fuzz >/dev/null || {
    echo "error: cargo-fuzz is not installed" >&2
    echo "hint: cargo install cargo-fuzz --locked" >&2
    exit 2
}

# Writes $1 as an unsigned little-endian integer of $2 bytes.
le() {
    local n=$1 width=$2 i
    for ((i = 0; i < width; i++)); do
        # shellcheck disable=SC2059
        printf "\\x$(printf %02x $(((n >> (8 * i)) & 255)))"
    done
}

# Copies the golden vectors (in the input layout each target expects) into corpus/<target>/.
seed() {
    local t=$1 dir="$here/corpus/$1"
    mkdir -p "$dir"
    case "$t" in
    config) cp "$vectors/config.bin" "$dir/seed-config" ;;
    cluster) cp "$vectors/cluster.bin" "$dir/seed-cluster" ;;
    sealed)
        cp "$vectors/sealed-config.bin" "$dir/seed-sealed"
        cp "$vectors/keyring.bin" "$dir/seed-keyring"
        ;;
    pack)
        cp "$vectors/pack.bin" "$dir/seed-pack"
        cp "$vectors/v1.3/pack.bin" "$dir/seed-pack-v1.3"
        ;;
    pack_index)
        # Input: blobs_end (u64 LE), then the index. In pack.bin the index ends 8 bytes before
        # the end of the pack, so the blobs end at len(pack) - 8 - len(index).
        # The same for the 1.3 index (TMPX) of v1.3/pack.bin.
        local pack_len index_len v
        for v in "" v1.3/; do
            pack_len=$(wc -c <"$vectors/${v}pack.bin")
            index_len=$(wc -c <"$vectors/${v}pack-index.bin")
            { le $((pack_len - 8 - index_len)) 8; cat "$vectors/${v}pack-index.bin"; } \
                >"$dir/seed-pack-index${v:+-v1.3}"
        done
        ;;
    chunk)
        # Input: ulen (u32 LE), then the frame. chunk.bin holds an 8192-byte chunk.
        { le 8192 4; cat "$vectors/chunk.bin"; } >"$dir/seed-chunk"
        ;;
    chunk_run)
        # Input: skip (u32 LE), piece (u32 LE), then the frame: chunk.bin (one chunk), and the
        # first frame of pack.bin (chunks A and B, format 1.4) cut into its two 8 KiB chunks.
        # That frame starts at byte 8; its clen is at byte 48 of pack-index.bin (entry 0).
        { le 0 4; le 8192 4; cat "$vectors/chunk.bin"; } >"$dir/seed-chunk"
        local clen
        clen=$(od -An -tu4 -j48 -N4 "$vectors/pack-index.bin" | tr -d ' ')
        { le 0 4; le 8192 4; tail -c +9 "$vectors/pack.bin" | head -c "$clen"; } >"$dir/seed-frame"
        ;;
    manifest)
        cp "$vectors/manifest.bin" "$dir/seed-manifest"
        cp "$vectors/v1.3/manifest.bin" "$dir/seed-manifest-v1.3"
        ;;
    wal_object)
        cp "$vectors/wal-segment.bin" "$dir/seed-wal-segment"
        cp "$vectors/wal-history.bin" "$dir/seed-wal-history"
        cp "$vectors/v1.5/wal-segment.bin" "$dir/seed-wal-segment-v15"
        cp "$vectors/v1.5/wal-history.bin" "$dir/seed-wal-history-v15"
        ;;
    wal_name)
        local n i=0
        for n in 000000010000000000000020 00000002.history 000000010000000A00000065.partial \
            000000010000000000000002.00000028.backup; do
            printf %s "$n" >"$dir/seed-name-$i"
            i=$((i + 1))
        done
        ;;
    wal_page_header) cp "$vectors/wal-long-page-header.bin" "$dir/seed-long-page-header" ;;
    keys)
        printf %s "packs/69/69b69f898760779ebb1a1edf9f79f6338f67cedc26b2306bbccd001bf2703110" >"$dir/seed-pack"
        printf %s "backups/20261121T204012Z.manifest" >"$dir/seed-manifest"
        printf %s "wal/00000001/000000010000000000000020" >"$dir/seed-wal"
        printf %s "config" >"$dir/seed-config"
        printf %s "clusters/7300000000000000001" >"$dir/seed-cluster"
        printf %s "locks/expire-0123456789abcdef0123456789abcdef" >"$dir/seed-lease"
        printf %s "gc/0123456789abcdef0123456789abcdef" >"$dir/seed-gc-state"
        ;;
    lease) cp "$vectors/lease.bin" "$dir/seed-lease" ;;
    gc_state) cp "$vectors/gc-state.bin" "$dir/seed-gc-state" ;;
    replication_stream)
        # split step, ReadyForQuery, then CopyData('d' + a ustar archive holding PG_VERSION).
        local tmp
        tmp=$(mktemp -d)
        printf '15\n' >"$tmp/PG_VERSION"
        tar --format=ustar -cf "$tmp/a.tar" -C "$tmp" PG_VERSION
        local n
        n=$(($(wc -c <"$tmp/a.tar") + 5))
        {
            printf '\x07Z\x00\x00\x00\x05I'
            printf 'd'
            # shellcheck disable=SC2059
            printf "\\x$(printf %02x $(((n >> 24) & 255)))\\x$(printf %02x $(((n >> 16) & 255)))\\x$(printf %02x $(((n >> 8) & 255)))\\x$(printf %02x $((n & 255)))"
            printf 'd'
            cat "$tmp/a.tar"
        } >"$dir/seed-base-backup"
        rm -rf "$tmp"
        ;;
    *)
        echo "error: unknown fuzz target $t" >&2
        exit 2
        ;;
    esac
}

cargo fuzz build --sanitizer none

failed=()
for t in "${targets[@]}"; do
    seed "$t"
    echo "=== fuzzing $t for ${seconds}s"
    if ! cargo fuzz run --sanitizer none "$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1; then
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "error: fuzz targets failed: ${failed[*]}" >&2
    echo "hint: reproduce with: cd fuzz && cargo fuzz run --sanitizer none <target> artifacts/<target>/<file>" >&2
    exit 1
fi
echo "all ${#targets[@]} fuzz targets ran ${seconds}s each without a failure"
