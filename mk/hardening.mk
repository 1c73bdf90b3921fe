# Hardening: the long runs behind `make test`'s bounded fuzz/load/fault tests (tests/hardening).
# Included at the END of the Makefile (uses STAMP, PY, OFFLINE and the `redis` target there).
#
#   make soak          the full-size fuzz, load, fault and scale-out runs; prints the numbers
#                      10,000 fuzz cases per door (gRPC and REST, with streams and corrupt
#                      bytes; 2,500 more at the corners of the accepted ranges), a server
#                      ended four ways with no worker left behind, 32 clients for 5
#                      minutes (after 1 minute of warm-up) with the server's memory trend,
#                      and Redis SIGKILLed and restarted 5 times under load; the
#                      bounded-work cases at full size (tests/hardening/test_bounded_work.py:
#                      16 unauthenticated 60 MB calls, 1,100 silent REST connections against
#                      the default cap); scale-out: three replicas with the
#                      shared encoder cache, a Sentinel failover under load through two servers
#                      (tests/soak/test_scale_out_soak.py)
#   make loadgen       the load generator alone against a server it starts (ARGS="--seconds 60")
#
# Knobs: SOAK_FUZZ_CASES, SOAK_LOAD_SECONDS, SOAK_REDIS_CYCLES. pytest's per-test timeout is
# off for the soak (a 10,000-case fuzz run takes longer than the 300 s `make test` allows).

SOAK_FUZZ_CASES ?= 10000
SOAK_LOAD_SECONDS ?= 300
SOAK_REDIS_CYCLES ?= 5

.PHONY: soak loadgen

soak: $(STAMP) redis
	PROXMO_SOAK=1 PROXMO_FUZZ_CASES=$(SOAK_FUZZ_CASES) \
	PROXMO_SOAK_LOAD_SECONDS=$(SOAK_LOAD_SECONDS) PROXMO_SOAK_REDIS_CYCLES=$(SOAK_REDIS_CYCLES) \
		$(OFFLINE) $(PY) -m pytest tests/hardening tests/soak -s -p no:cacheprovider \
		--timeout 0 $(PYTEST_ARGS)

loadgen: $(STAMP)
	$(OFFLINE) $(PY) tests/soak/loadgen.py --spawn $(ARGS)
