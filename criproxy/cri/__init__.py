"""CRI helpers and the types every decision is made of: the method table, a call's context,
annotations and their lookup, Kubernetes quantities, and adjustments (what an interceptor
proposes). Below the interceptors and policies, above the generated protobuf modules."""
