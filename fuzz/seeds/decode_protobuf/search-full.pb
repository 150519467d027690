
u1s1àÄì®ÿ+Z!
red shoes å¥³é‹	price_ascc3