.PHONY: setup test demo
setup:
	./setup.sh
test:
	.venv/bin/python -m pytest -q
demo:
	.venv/bin/python -m launcher pipeline --config configs/demo.yaml
