//! Where an event stream or long-poll resumes: the `Last-Event-ID` header, `?after=`
//! and `?last_event_id=` (with the query string's percent-decoding), and
//! `after=delivered`.
//!
//! Input: 8 bytes of `delivered` (little-endian), one flag byte (bit 0: a header is
//! there, bit 1: a query string is), then the header's value and the query string,
//! split at the first newline.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rpcgate::fuzzing::resume_after;

fuzz_target!(|data: &[u8]| {
    let Some((delivered, rest)) = data.split_first_chunk::<8>() else {
        return;
    };
    let delivered = u64::from_le_bytes(*delivered);
    let Some((&flags, rest)) = rest.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let (header, query) = text.split_once('\n').unwrap_or((text, ""));
    let header = (flags & 1 != 0).then_some(header);
    let query = (flags & 2 != 0).then_some(query);

    let after = resume_after(header, query, delivered);
    // The header wins over any query string.
    if let Some(h) = header {
        assert_eq!(after, resume_after(Some(h), None, delivered));
        if h.trim() == "delivered" {
            assert_eq!(after, Some(delivered));
        }
    }
    // Without a header, `after` wins over `last_event_id`, whatever follows.
    if header.is_none()
        && let Some(q) = query
        && after.is_some()
    {
        let mut both = String::from(q);
        both.push_str("&last_event_id=1");
        assert_eq!(resume_after(None, Some(&both), delivered), after);
    }
    // What a client writes is read back.
    let n = delivered.rotate_left(u32::from(flags));
    assert_eq!(
        resume_after(Some(&n.to_string()), query, delivered),
        Some(n)
    );
    let q = format!("session=s&after={n}");
    assert_eq!(resume_after(None, Some(&q), delivered), Some(n));
    assert_eq!(
        resume_after(None, Some("after=delivered"), delivered),
        Some(delivered)
    );
});
