//! QEMU's QDict member order, used only to pick which of several bad request members QEMU
//! would name first.

/// QDict's bucket for `key`: QEMU iterates a dict bucket by bucket, so a lower bucket is
/// visited, and reported, first.
pub(crate) fn bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let mut value: u32 = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &c) in bytes.iter().enumerate() {
        value = value.wrapping_add(u32::from(c) << ((i as u32 * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % 512
}

#[cfg(test)]
mod tests {
    use super::bucket;

    #[test]
    fn buckets_match_the_reference_table() {
        // Values from the reference (qmp-wire.md §1) and tools/qdict_order.py.
        for (key, b) in [
            ("timestamp", 26),
            ("seconds", 5),
            ("QMP", 99),
            ("version", 184),
            ("class", 211),
            ("capabilities", 216),
            ("minor", 225),
            ("micro", 225),
            ("qemu", 232),
            ("return", 401),
            ("id", 486),
            ("error", 489),
            ("data", 505),
            ("exec-oob", 162),
            ("execute", 299),
        ] {
            assert_eq!(bucket(key), b, "{key}");
        }
    }
}
