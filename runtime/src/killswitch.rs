//! The kill switch file: who engaged it, when, why.
