# imagefarm: vLLM cannot parse MIG/GPU UUIDs in CUDA_VISIBLE_DEVICES; use 0..n-1
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [[ "$CUDA_VISIBLE_DEVICES" =~ (MIG|GPU)- ]]; then
  _n=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES")
  _old=$CUDA_VISIBLE_DEVICES
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((_n - 1)))
  export CUDA_VISIBLE_DEVICES
  echo "imagefarm: CUDA_VISIBLE_DEVICES remapped from UUIDs ($_old) to $CUDA_VISIBLE_DEVICES" >&2
  unset _n _old
fi
