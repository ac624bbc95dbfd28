//! The mTLS server: listeners, routes, the vision gate, load control.
