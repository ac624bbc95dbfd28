//! The one mTLS HTTP client builder: controller health checks, canary probes and tests use it.
