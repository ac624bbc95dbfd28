//! Certificate authority, server and client certificates (rcgen), shared by `cathedralctl certs` and tests.
