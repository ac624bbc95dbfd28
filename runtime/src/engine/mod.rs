//! Generation: caches, sampling, the decode loop, the engine the server drives.
