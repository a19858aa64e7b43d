//! Shared by the targets that check borrowing: rpcgate keeps ids, methods and payloads
//! as slices of the buffer it read, never as copies (`jsonrpc/mod.rs`).

/// Panics unless `part` lies inside `whole`.
pub fn assert_within(whole: &[u8], part: &[u8]) {
    let start = whole.as_ptr() as usize;
    let at = part.as_ptr() as usize;
    assert!(
        at >= start && at + part.len() <= start + whole.len(),
        "{:?} is not a slice of the input",
        String::from_utf8_lossy(part)
    );
}
