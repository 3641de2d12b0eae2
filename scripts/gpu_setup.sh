# Sourced by the device-machine scripts (gpu_p3.sh, gpu_speed.sh, gpu_ncu.sh), from the repo root:
# the package importable as pagedeploy from the working tree, the carried wheels (.whl, and .whl-bnb
# if carried) installed beside it, and D, a `deploy` command line.
mkdir -p /tmp/pd/pagedeploy && for d in kernels launcher runtime quant profiles schemas; do ln -sfn $PWD/$d /tmp/pd/pagedeploy/$d; done && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl $(ls .whl-bnb/*.whl 2>/dev/null) && export PYTHONPATH=/tmp/pd:/tmp/site:$PWD/scripts PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
D="python3 -c 'import sys; from pagedeploy.launcher.cli import main; sys.argv[0]=\"deploy\"; main()'"
