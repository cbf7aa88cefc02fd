.PHONY: install self-test test ci
install:
	pip install -r requirements.txt
self-test:
	python quantize_nvfp4.py --self_test
test:
	pip install -r requirements-dev.txt && python -m pytest -q
ci:
	bash .ci/run
