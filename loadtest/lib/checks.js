// Checks whose predicate may look into a body that is not what it should be: a predicate
// that throws (a missing field, a body that is not JSON) is a failed check, not a crashed
// iteration, so the run goes on and the summary counts it.

import { check } from 'k6';

/** `check(value, {[name]: predicate})`, a throwing predicate counting as false. */
export function verify(value, name, predicate) {
  return check(value, {
    [name]: (v) => {
      try {
        return Boolean(predicate(v));
      } catch (_) {
        return false;
      }
    },
  });
}
