"""What prodsample adds to a vLLM API server, named without importing vLLM (the client runs without it): the
paths `prodsample.vllm.middleware` serves and the `--middleware` values that install it."""

__all__ = ["RECORDS_PATH", "ENGINE_INFO_PATH", "MIDDLEWARE", "DP_RANK_HEADER"]

RECORDS_PATH = "/v1/prodsample/records"  # POST {"rollouts": [names]}: their records, deleted on the server
ENGINE_INFO_PATH = "/v1/prodsample/engine_info"  # GET: what the client checks before sending
DP_RANK_HEADER = "X-data-parallel-rank"  # vLLM routes a request with it to that data-parallel engine
MIDDLEWARE = ("prodsample.vllm.middleware.TagCheck", "prodsample.vllm.middleware.RecordsEndpoint")
