# Sourced by the device scripts (run_device.sh, device_check.sh): the peers' wheels from .whl/
# (sgl-deep-gemm + apache-tvm-ffi) into /tmp/site, and the engine glue importable as
# moe_backend_integrations (a package-dir mapping pip --target lacks), all on PYTHONPATH.
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
mkdir -p /tmp/shim && ln -sfn "$PWD/integrations" /tmp/shim/moe_backend_integrations
export PYTHONPATH="$PYTHONPATH:/tmp/shim"
