//! Issue point 1 at the boundary: a bad config stops `herald ews` with one
//! error naming the key and what is allowed.
