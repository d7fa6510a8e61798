//! Multi-row statements: how many rows go in one, and their placeholder tuples.

use super::Placeholders;

/// Up to this many items go in one statement of exactly their number: the group commits
/// of `durability = "ledger"` are about as large as the number of clients waiting, and each
/// statement is a round trip (to SQLite's worker thread, or to PostgreSQL) within the
/// commit every one of them waits for.
const EXACT_ROWS_MAX: usize = 64;

/// Prepared statements kept per connection: the writer's four statements in every shape
/// [`pow2_chunks`] makes (up to [`EXACT_ROWS_MAX`] exact ones and a dozen powers of two
/// each), with room for the rest.
pub(crate) const STATEMENT_CACHE: usize = 512;

/// `items` cut into chunks of at most `max` items: powers of two, largest first, then the
/// last [`EXACT_ROWS_MAX`] or fewer in one chunk: 300 items with `max` 1000 are 256 + 44,
/// and 40 items are one chunk. A statement per chunk size then has fewer than a hundred
/// shapes, which the prepared-statement cache keeps ([`STATEMENT_CACHE`]).
pub(super) fn pow2_chunks<T>(items: &[T], max: usize) -> Vec<&[T]> {
    let max = if max == 0 { 1 } else { 1 << max.ilog2() };
    let exact = EXACT_ROWS_MAX.min(max);
    let mut chunks = Vec::new();
    let mut rest = items;
    while !rest.is_empty() {
        let size = if rest.len() <= exact {
            rest.len()
        } else {
            (1 << rest.len().ilog2()).min(max)
        };
        let (chunk, tail) = rest.split_at(size);
        chunks.push(chunk);
        rest = tail;
    }
    chunks
}

/// `rows` parenthesised tuples of `width` placeholders, numbering from `first`:
/// `tuples(Placeholders::Numbered, 2, 2, 3)` is `($3, $4), ($5, $6)`.
pub(crate) fn tuples(
    placeholders: Placeholders,
    rows: usize,
    width: usize,
    first: usize,
) -> String {
    let mut sql = String::with_capacity(rows * width * 7);
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..width {
            if c > 0 {
                sql.push_str(", ");
            }
            match placeholders {
                Placeholders::Numbered => {
                    sql.push('$');
                    sql.push_str(&(first + r * width + c).to_string());
                }
                Placeholders::InOrder => sql.push('?'),
            }
        }
        sql.push(')');
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_powers_of_two_then_one_small_rest_within_the_limit_covering_every_item_once() {
        let items: Vec<usize> = (0..1300).collect();
        for (n, max) in [(0, 8), (1, 8), (300, 1000), (1300, 1000), (1300, 3), (7, 0)] {
            let chunks = pow2_chunks(&items[..n], max);
            let sizes: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
            let (last, head) = sizes.split_last().unwrap_or((&0, &[]));
            assert!(
                head.iter().all(|s| s.is_power_of_two() && *s <= max.max(1))
                    && *last <= max.max(1)
                    && (last.is_power_of_two() || *last <= EXACT_ROWS_MAX),
                "{sizes:?}"
            );
            let joined: Vec<usize> = chunks.concat();
            assert_eq!(joined, items[..n], "{n} items, max {max}");
        }
        let sizes = |n, max| -> Vec<usize> {
            pow2_chunks(&items[..n], max)
                .iter()
                .map(|c| c.len())
                .collect()
        };
        assert_eq!(sizes(300, 1000), [256, 44]);
        assert_eq!(sizes(1300, 1000), [512, 512, 256, 20]);
        assert_eq!(sizes(40, 1000), [40]);
        assert_eq!(sizes(64, 1000), [64]);
        assert_eq!(sizes(65, 1000), [64, 1]);
        assert_eq!(sizes(7, 4), [4, 3]);
    }
}
