//! The sizes an error suggests for an image side that is not a multiple of what the model
//! needs: the multiples either side of it, as long as they are within the limits, so a
//! suggestion is always a size the daemon accepts (and never overflows).

/// The suggestion for a side `v` that is not a multiple of `multiple`, with `max` the
/// largest side allowed: the multiples below and above `v` that lie in `1..=max`
/// (`"64 or 80"`, `"64"`), else the largest multiple within `max`
/// (`"2048, the largest allowed"`), else `multiple` itself.
pub(super) fn suggested_sizes(v: usize, multiple: usize, max: usize) -> String {
    let multiple = multiple.max(1);
    let below = v / multiple * multiple;
    let above = below.checked_add(multiple);
    let fits = |s: usize| (1..=max).contains(&s);
    match (Some(below).filter(|&s| fits(s)), above.filter(|&s| fits(s))) {
        (Some(b), Some(a)) => format!("{b} or {a}"),
        (Some(s), None) | (None, Some(s)) => s.to_string(),
        (None, None) => match max / multiple * multiple {
            0 => multiple.to_string(),
            largest => format!("{largest}, the largest allowed"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::suggested_sizes;

    #[test]
    fn both_neighbours_when_both_fit() {
        assert_eq!(suggested_sizes(72, 16, 2048), "64 or 80");
        assert_eq!(suggested_sizes(5, 8, 2048), "8");
    }

    #[test]
    fn never_above_the_limit_nor_overflowing() {
        assert_eq!(suggested_sizes(2047, 8, 2048), "2040 or 2048");
        assert_eq!(suggested_sizes(2049, 8, 2048), "2048");
        assert_eq!(
            suggested_sizes(4_294_967_295, 8, 2048),
            "2048, the largest allowed"
        );
        assert_eq!(
            suggested_sizes(usize::MAX, 64, usize::MAX),
            (usize::MAX / 64 * 64).to_string()
        );
        assert_eq!(suggested_sizes(100, 64, 32), "64");
    }
}
