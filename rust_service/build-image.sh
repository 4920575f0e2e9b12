#!/usr/bin/env bash
# Builds the rust_service container image FROM scratch, without pulling anything:
#   rust_service/build-image.sh [IMAGE_TAG [DOCKER_BUILD_ARGS...]]   (default: weather-rust-service:latest)
# Extra arguments go to `docker build` (containers/build.py adds --label with the model version).
# Inputs (environment):
#   ORT_DYLIB_PATH  libonnxruntime.so.1.* to ship (default: the one in ../.venv's onnxruntime wheel)
#   MODEL_PATH      BentoML model directory with model.yaml + model.onnx (required;
#                   `python -m containers.build --only rust` passes the store's latest model)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
image="${1:-weather-rust-service:latest}"
shift $(( $# > 0 ? 1 : 0 ))

ort_lib="${ORT_DYLIB_PATH:-}"
if [[ -z "$ort_lib" ]]; then
    ort_lib="$(ls "$here"/../.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.1.* 2>/dev/null | head -n1 || true)"
fi
[[ -f "$ort_lib" ]] || { echo "build-image.sh: libonnxruntime.so.1.* not found; set ORT_DYLIB_PATH" >&2; exit 1; }

model_dir="${MODEL_PATH:-}"
[[ -n "$model_dir" ]] || { echo "build-image.sh: set MODEL_PATH (or run python -m containers.build --only rust)" >&2; exit 1; }
for f in model.yaml model.onnx; do
    [[ -f "$model_dir/$f" ]] || { echo "build-image.sh: $model_dir/$f is missing" >&2; exit 1; }
done

(cd "$here" && cargo build --release --locked)
binary="$here/target/release/rust_service"

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
rootfs="$context/rootfs"
mkdir -p "$rootfs/app/lib" "$rootfs/app/model" "$rootfs/etc" "$rootfs/tmp"
chmod 1777 "$rootfs/tmp"
install -m 0755 "$binary" "$rootfs/app/rust_service"
install -m 0644 "$ort_lib" "$rootfs/app/lib/libonnxruntime.so"
install -m 0644 "$model_dir/model.yaml" "$model_dir/model.onnx" "$rootfs/app/model/"

# The shared libraries both ELF files need (the dlopen'ed library's needs do not show in
# the binary's ldd), copied to the paths ldd resolves them to, symlinks followed.
libs="$( { ldd "$binary"; ldd "$ort_lib"; } | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)"
for lib in $libs; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
done

printf 'root:x:0:0:root:/:/sbin/nologin\napp:x:10001:10001:rust_service:/app:/sbin/nologin\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\napp:x:10001:\n' > "$rootfs/etc/group"

cp "$here/Dockerfile" "$context/Dockerfile"
echo "build-image.sh: context $(du -sh "$rootfs" | cut -f1) ($(echo "$libs" | wc -l) system libraries)"
DOCKER_BUILDKIT=0 docker build --pull=false "$@" -t "$image" "$context"
docker image inspect "$image" --format 'build-image.sh: {{.RepoTags}} {{.Size}} bytes'
