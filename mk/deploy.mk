# Shipping edge-model-loader as an Azure IoT Edge module (docs/deployment.md). Included by the
# Makefile, which defines VENV and the $(STAMP) setup target; the default below lets this file work
# on its own too.
#
#   make image [PLATFORMS=linux/amd64]   build the image (one platform: also loaded into local docker)
#   make push                            build and push <repo>:<version>-amd64, -arm64v8 and <repo>:<version>
#   make deployment                      config/deployment.amd64.json and .arm64v8.json from the template
#   make lint-docker                     hadolint docker/Dockerfile

VENV ?= .venv
DOCKER ?= docker
PLATFORMS ?= linux/amd64,linux/arm64
# iotedgedev platform names, one deployment manifest each.
EDGE_PLATFORMS ?= amd64 arm64v8
# A docker-container buildx builder: the default "docker" driver cannot build several platforms at once.
# It uses the host network so that a registry at localhost:5000 is the host's, not the builder container's.
BUILDER ?= edge-model-loader

# The registry: the environment, else .env (the file iotedgedev reads too), else a local registry.
CONTAINER_REGISTRY_SERVER ?= $(or $(shell sed -n 's/^CONTAINER_REGISTRY_SERVER=//p' .env 2>/dev/null | tr -d '"'"'"),localhost:5000)

# Image name and version come from docker/module.json, as iotedgedev reads them, so the tags pushed
# here are the ones the generated manifests name.
_module_json = python3 -c 'import json, os, sys; m = json.load(open("docker/module.json"))["image"]; print(os.path.expandvars(m["repository"] if sys.argv[1] == "repo" else m["tag"]["version"]))'
IMAGE = $(shell CONTAINER_REGISTRY_SERVER='$(CONTAINER_REGISTRY_SERVER)' $(_module_json) repo)
IMAGE_VERSION = $(shell $(_module_json) version)

_comma := ,
_platform_list = $(subst $(_comma), ,$(PLATFORMS))
# linux/amd64 -> amd64, linux/arm64 -> arm64v8 (the iotedgedev / IoT Edge tag suffixes)
_edge_arch = $(patsubst arm64,arm64v8,$(patsubst arm/v7,arm32v7,$(patsubst linux/%,%,$(1))))
_buildx = $(DOCKER) buildx build --builder $(BUILDER) -f docker/Dockerfile

# Writes the iotedgedev settings (no telemetry, no first-run banner) into a private HOME, so
# `make deployment` never turns on telemetry in the user's own ~/.iotedgedev.
IOTEDGEDEV_HOME = $(CURDIR)/.tools/iotedgedev-home

.PHONY: image push deployment lint-docker buildx-builder

buildx-builder:
	@$(DOCKER) buildx inspect $(BUILDER) >/dev/null 2>&1 \
		|| $(DOCKER) buildx create --name $(BUILDER) --driver docker-container --driver-opt network=host >/dev/null

# Several platforms: the result stays in the builder's cache (docker cannot load a multi-platform
# image); `make push` reuses it. One platform: loaded into docker as <repo>:<version>-<arch> too.
image: buildx-builder
	$(_buildx) --platform $(PLATFORMS) -t $(IMAGE):$(IMAGE_VERSION) \
		$(if $(findstring $(_comma),$(PLATFORMS)),,--load -t $(IMAGE):$(IMAGE_VERSION)-$(call _edge_arch,$(PLATFORMS))) .

# One tag per architecture (what the generated manifests reference) plus a multi-platform tag.
push: buildx-builder
	$(foreach p,$(_platform_list),$(_buildx) --platform $(p) -t $(IMAGE):$(IMAGE_VERSION)-$(call _edge_arch,$(p)) --push . &&) \
		$(_buildx) --platform $(PLATFORMS) -t $(IMAGE):$(IMAGE_VERSION) --push .

deployment: $(STAMP)
	@mkdir -p $(IOTEDGEDEV_HOME)/.iotedgedev
	@printf '[DEFAULT]\nfirsttime = no\ncollect_telemetry = no\n' > $(IOTEDGEDEV_HOME)/.iotedgedev/setting.ini
	$(foreach p,$(EDGE_PLATFORMS),HOME=$(IOTEDGEDEV_HOME) CONTAINER_REGISTRY_SERVER='$(CONTAINER_REGISTRY_SERVER)' \
		$(VENV)/bin/iotedgedev solution genconfig \
		-f deployment.template.json -P $(p) --fail-on-validation-error &&) true
	@# iotedgedev leaves a variable it does not know as it is (e.g. no CONTAINER_REGISTRY_USERNAME in .env).
	@if grep -n '\$${' $(foreach p,$(EDGE_PLATFORMS),config/deployment.$(p).json); then \
		echo "error: unexpanded variables above: define them in .env (see .env.example; empty is fine)"; exit 1; fi
	@echo "wrote $(foreach p,$(EDGE_PLATFORMS),config/deployment.$(p).json) (images $(IMAGE):$(IMAGE_VERSION)-<arch>)"

lint-docker: $(STAMP)
	$(VENV)/bin/hadolint docker/Dockerfile
