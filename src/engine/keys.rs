//! The names of every engine key, in one place.
//!
//! A SKU's keys are handed to its scripts in the order `lua/prelude.lua` lists them (its
//! `KEYS` list, named in the table `K` by its `begin`); [`sku_keys`] builds exactly that list, and a test
//! below reads the prelude to keep the two in step. Every key of one SKU carries the SKU's
//! hash tag (`kg:{<sku>}:…`), so a script touches one Redis Cluster slot. Keys outside a
//! SKU (the global code index, the SKU registry, the limiters' windows) have hash tags of
//! their own, so they spread over the cluster instead of making one slot hot.
//!
//! Both the inventory and the event writer name keys through here, so neither imports the
//! other for a name.

/// The parts of a SKU's keys, in `lua/prelude.lua`'s order.
const SKU_PARTS: [&str; 14] = [
    "meta",
    "avail",
    "keys",
    "codes",
    "idx",
    "orders",
    "holds",
    "users",
    "redemptions",
    "counts",
    "events",
    "pools",
    "settled",
    "retired",
];

fn sku_key(sku: &str, part: &str) -> String {
    format!("kg:{{{sku}}}:{part}")
}

/// The keys of one SKU, in the order `lua/prelude.lua` expects; all share the hash tag.
pub fn sku_keys(sku: &str) -> Vec<String> {
    SKU_PARTS.iter().map(|part| sku_key(sku, part)).collect()
}

/// The SKU's settings hash key.
pub fn meta_key(sku: &str) -> String {
    sku_key(sku, "meta")
}

/// The SKU's orders hash key.
pub fn orders_key(sku: &str) -> String {
    sku_key(sku, "orders")
}

/// The SKU's fingerprints of retired orders (see `lua/retire.lua`).
pub fn retired_key(sku: &str) -> String {
    sku_key(sku, "retired")
}

/// The SKU's event stream key.
pub fn events_key(sku: &str) -> String {
    sku_key(sku, "events")
}

/// The SKU's dead-letter stream: poison entries of its event stream, moved aside.
pub fn dead_letters_key(sku: &str) -> String {
    sku_key(sku, "dead")
}

/// The set of every SKU the engine has, for listing them.
pub const REGISTRY: &str = "kg:skus";

/// The shard of the global code index that holds `digest`. The index is sharded by the
/// digest's first hex digit, so on Redis Cluster it spreads over 16 slots instead of one
/// hot key.
pub fn index_shard(digest: &str) -> String {
    format!("kg:{{ix{}}}:codes", digest_shard(digest))
}

/// The hex digit a digest is sharded by: the first of its hex part, after the index key id
/// that keyed digests begin with (`<id>.<hex>`, see [`crate::secrets`]).
pub fn digest_shard(digest: &str) -> &str {
    let hex = digest.rsplit_once('.').map_or(digest, |(_, hex)| hex);
    hex.get(..1).unwrap_or("0")
}

/// Every shard of the global index.
pub fn index_shards() -> impl Iterator<Item = String> {
    "0123456789abcdef"
        .chars()
        .map(|c| format!("kg:{{ix{c}}}:codes"))
}

/// Whether a SKU of this name would share keys with the global index: the shards' hash tags
/// (`ix0` … `ixf`) are in the SKUs' key space, so a SKU `ix0` would have the shard
/// `kg:{ix0}:codes` as its own `codes` key. Such names are refused (`sku::check_sku`).
pub fn is_reserved_sku(sku: &str) -> bool {
    matches!(sku.as_bytes(), [b'i', b'x', d] if d.is_ascii_digit() || (b'a'..=b'f').contains(d))
}

/// The keys of a sliding window (`lua/window.lua`): its events and its lockout, sharing the
/// hash tag of the limited `subject` under rule `kind`.
pub fn window_keys(kind: &str, subject: &str) -> Vec<String> {
    vec![
        format!("kg:lim:{{{kind}:{subject}}}:events"),
        window_lock_key(kind, subject),
    ]
}

/// The lockout of [`window_keys`] alone, for reading it outside the script.
pub fn window_lock_key(kind: &str, subject: &str) -> String {
    format!("kg:lim:{{{kind}:{subject}}}:lock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sku_keys_follow_the_order_of_the_prelude() {
        let prelude = include_str!("../../lua/prelude.lua");
        // `local function begin(keys, argv) … K = { meta = keys[1], avail = keys[2], … }`
        let table = prelude
            .split_once("local function begin(keys, argv)")
            .and_then(|(_, rest)| rest.split_once("K = {"))
            .and_then(|(_, rest)| rest.split_once('}'))
            .map(|(table, _)| table)
            .expect("the prelude's begin names the call's keys in a table K");
        let mut named: Vec<(usize, &str)> = table
            .split(',')
            .filter_map(|entry| {
                let (name, index) = entry.split_once("= keys[")?;
                let index = index.trim().trim_end_matches(']').parse().ok()?;
                Some((index, name.trim()))
            })
            .collect();
        named.sort();
        let in_order: Vec<&str> = named.iter().map(|(_, name)| *name).collect();
        assert_eq!(in_order, SKU_PARTS);
        assert_eq!(
            named.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            (1..=SKU_PARTS.len()).collect::<Vec<_>>()
        );
        let keys = sku_keys("s");
        assert_eq!(keys.len(), SKU_PARTS.len());
        assert!(keys.iter().all(|k| k.starts_with("kg:{s}:")), "{keys:?}");
    }

    #[test]
    fn no_sku_shares_a_key_with_the_index() {
        for shard in index_shards() {
            let tag = &shard["kg:{".len()..shard.find('}').expect("a hash tag")];
            assert!(is_reserved_sku(tag), "{tag}");
            assert!(
                sku_keys(tag).contains(&shard),
                "the clash this guards against"
            );
        }
        for name in ["ix", "ix10", "IX0", "ixg", "x0", "aix0"] {
            assert!(!is_reserved_sku(name), "{name}");
        }
    }

    #[test]
    fn every_index_shard_is_one_of_sixteen() {
        let shards: Vec<String> = index_shards().collect();
        assert_eq!(shards.len(), 16);
        for digit in "0123456789abcdef".chars() {
            assert!(shards.contains(&index_shard(&format!("{digit}ff"))));
        }
        assert_eq!(index_shard(""), "kg:{ix0}:codes");
    }
}
