
u3s3ÈÌì®ÿ+Z-
#tab	here "quoted" Ã©ğŸ˜€ line
breaknewest