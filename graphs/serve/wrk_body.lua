-- wrk script of the capacity run: POST one pre-built KServe v2 body (file FUSEDGATE_BODY) with its headers
-- (FUSEDGATE_HEADER_LENGTH: Inference-Header-Content-Length for a binary body, empty for JSON).
local file = assert(io.open(os.getenv("FUSEDGATE_BODY"), "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
local header_length = os.getenv("FUSEDGATE_HEADER_LENGTH")
if header_length ~= nil and header_length ~= "" then
  wrk.headers["Inference-Header-Content-Length"] = header_length
  wrk.headers["Content-Type"] = "application/octet-stream"
else
  wrk.headers["Content-Type"] = "application/json"
end
